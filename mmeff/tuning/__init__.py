"""Tuning of pruning schedules: token-budget arithmetic (light) and the VFlowOpt tuner (``mmeff.tuning.tuner``,
imported on demand: it needs optuna)."""

from mmeff.tuning.budget import (
    averaged_budget,
    fastv_ratio_for_budget,
    kept_fraction,
    scale_layers,
    solve_last_ratio,
)

__all__ = ["averaged_budget", "fastv_ratio_for_budget", "kept_fraction", "scale_layers", "solve_last_ratio"]
