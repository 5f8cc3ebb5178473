"""Token budgets of progressive pruning schedules, averaged over the decoder layers.

A schedule keeps the fraction ``r_v`` of the visual tokens from the input (layer 0) on and multiplies the
remaining share by ``r_i`` before each layer ``l_i``. Its kept share averaged over ``n`` layers is::

    kept = (r_v * l_1 + r_v r_1 (l_2 - l_1) + ... + r_v r_1 ... r_k (n - l_k)) / n,    budget = 1 - kept

(the official VFlowOpt constraint; recycled cell tokens are not counted, as there). FastV with ``k`` full
layers then ratio ``r`` keeps ``(k + (1 - r)(n - k)) / n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmeff.errors import ConfigError


def kept_fraction(r_v: float, layers: Sequence[int], ratios: Sequence[float], n_layers: int) -> float:
    """Visual-token share kept, averaged over ``n_layers`` decoder layers (see the module docstring)."""
    if len(layers) != len(ratios):
        raise ConfigError(f"{len(layers)} pruning layers but {len(ratios)} ratios; need one ratio per layer")
    bounds = [0, *layers, n_layers]
    share, total = r_v, 0.0
    for i in range(len(bounds) - 1):
        if i > 0:
            share *= ratios[i - 1]
        total += share * (bounds[i + 1] - bounds[i])
    return total / n_layers


def solve_last_ratio(budget: float, r_v: float, layers: Sequence[int], ratios: Sequence[float], n_layers: int) -> float:
    """The last ratio of the schedule (``ratios[-1]``, or ``r_v`` without LLM stages) that makes the averaged
    budget equal ``budget``; ``ratios[-1]`` itself is ignored. Not clamped: outside [0, 1] means infeasible."""
    target = (1.0 - budget) * n_layers
    if not layers:
        return target / n_layers
    head = kept_fraction(r_v, layers[:-1], ratios[:-1], layers[-1]) * layers[-1]  # layers before the last stage
    share = r_v
    for r in ratios[:-1]:
        share *= r
    span = n_layers - layers[-1]
    if share * span == 0:
        raise ConfigError("the budget cannot be reached: the share left before the last stage is zero")
    return (target - head) / (share * span)


def scale_layers(layers: Sequence[int], layers_of: int, n_layers: int) -> tuple[int, ...]:
    """Layers written for a ``layers_of``-layer decoder, moved to ``n_layers`` (``layers_of`` 0: as given)."""
    if layers_of <= 0 or layers_of == n_layers:
        return tuple(int(x) for x in layers)
    return tuple(round(x * n_layers / layers_of) for x in layers)


def fastv_ratio_for_budget(budget: float, n_layers: int, k: int = 2) -> float:
    """FastV's ratio whose averaged budget over ``n_layers`` equals ``budget`` (k layers keep everything)."""
    ratio = 1.0 - ((1.0 - budget) * n_layers - k) / (n_layers - k)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"fastv with k={k} cannot reach budget {budget} on {n_layers} layers (ratio {ratio:.4f})")
    return ratio


def averaged_budget(config: Any, n_layers: int) -> float:
    """Fraction of visual tokens removed, averaged over ``n_layers`` decoder layers, of a VFlowOpt or FastV
    config (VFlowOpt: layers scaled and the last ratio solved as the method runs them)."""
    if config.method == "fastv":
        return 1.0 - (config.k + (1.0 - config.ratio) * (n_layers - config.k)) / n_layers
    if config.method == "vflowopt":
        layers, ratios = effective_schedule(config, n_layers)
        return 1.0 - kept_fraction(config.r_v, layers, ratios, n_layers)
    if config.method == "none":
        return 0.0
    raise ConfigError(f"averaged_budget does not know method {config.method!r} (vflowopt, fastv, none)")


def effective_schedule(config: Any, n_layers: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The (layers, ratios) the method runs on an ``n_layers`` decoder: layers scaled from ``layers_of``,
    the last ratio (or ``r_v``, without LLM stages) solved for ``budget`` when one is set."""
    layers = scale_layers(config.llm_layers, config.layers_of, n_layers)
    ratios = tuple(float(r) for r in config.llm_ratios)
    if len(layers) != len(ratios):
        raise ConfigError(f"vflowopt: {len(layers)} llm_layers but {len(ratios)} llm_ratios; need one ratio per layer")
    if any(not 1 <= x < n_layers for x in layers) or list(layers) != sorted(set(layers)):
        raise ConfigError(
            f"vflowopt: llm_layers {list(config.llm_layers)} (as {list(layers)} on {n_layers} layers) must be "
            f"strictly increasing and within [1, {n_layers - 1}]"
        )
    if config.budget is not None and layers:
        last = solve_last_ratio(config.budget, config.r_v, layers, ratios, n_layers)
        if not 0.0 <= last <= 1.0 + 1e-9:
            raise ConfigError(
                f"vflowopt: budget {config.budget} is out of reach with r_v={config.r_v}, ratios {list(ratios[:-1])} "
                f"at layers {list(layers)} of {n_layers} (the last ratio would be {last:.4f})"
            )
        ratios = (*ratios[:-1], min(last, 1.0))
    return layers, ratios


def effective_r_v(config: Any) -> float:
    if config.budget is not None and not config.llm_layers:
        return 1.0 - config.budget
    return config.r_v
