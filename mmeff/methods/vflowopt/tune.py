"""Information-flow-guided tuning of VFlowOpt (the official ``llava_ov_opt_all.py`` search, with optuna).

Objective: over the tuning samples, the sum of cosine similarities between the last decoder layer's hidden
state of the last prompt token (the state that predicts the first generated token) of the full model and of
the pruned model. Bayesian optimisation with a Gaussian-process sampler (optuna's ``GPSampler``; the official
code used scikit-optimize's GP optimiser, 300 calls, 27 initial points, seed 42). The last ratio is not
searched: it follows from the token-budget constraint. r_1 is drawn as a position inside the interval where
that last ratio lies in [0, 1] (:func:`r1_interval`, intersected with the box below), so no trial is wasted on
an infeasible schedule; only an r_v with no feasible r_1 in the box is pruned. The official constraint does not
count the recycled cell tokens; with a small ``m`` they outnumber the budget (at 90% on a 16 x 16 grid, m = 3
recycles up to 36 cells while r_v N is 26, and the input stage keeps 36 tokens). A trial whose *measured* share
of removed visual tokens (averaged over layers, cells included) falls short of the budget by more than
``budget_tolerance`` is therefore pruned too: a tuned preset really removes what its name says.

Search space, scaled from the official one for budget b (kept share k = 1 - b; the official values are those of
k = 0.25): r_v in [k, min(1, 1.5 k)], r_1 in [0.8 k / min(1, 1.5 k), 1], t in [0, 50], m in [3, 24],
alpha_v in [-1, 1].

Tuning data: batches of model inputs, built by the caller (``mmeff tune vflowopt`` uses training scenes of the
lab's reference generator — never the benchmarks' held-out seeds — or a user's JSON-lines file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmeff.errors import ConfigError
from mmeff.methods.vflowopt.budget import kept_fraction, scale_layers, solve_last_ratio
from mmeff.methods.vflowopt.method import VFlowOptConfig


def search_space(budget: float) -> dict[str, tuple[float, float]]:
    k = 1.0 - budget
    hi = min(1.0, 1.5 * k)
    return {"r_v": (k, hi), "r_1": (min(1.0, 0.8 * k / hi), 1.0), "t": (0.0, 50.0), "m": (3.0, 24.0),
            "alpha_v": (-1.0, 1.0)}


def r1_interval(budget: float, r_v: float, layers: Sequence[int], n_layers: int) -> tuple[float, float]:
    """The r_1 for which the budget's r_2 lies in [0, 1] (two LLM stages ``l_1 < l_2``): from
    ``(1 - budget) n = r_v l_1 + r_v r_1 ((l_2 - l_1) + r_2 (n - l_2))``, r_2 = 1 gives the low end, r_2 = 0 the
    high end. The search draws r_1 inside it, so every trial meets the budget (on shallow decoders the
    feasible part of the official box is thin, and rejected draws would teach the sampler nothing)."""
    l1, l2 = layers
    rest = (1.0 - budget) * n_layers - r_v * l1
    return rest / (r_v * (n_layers - l1)), rest / (r_v * (l2 - l1))


def last_token_state(model: Any, inputs: Any) -> torch.Tensor:
    """[B, d] last decoder layer output (after the final norm, as ``hidden_states[-1]``) at the last position."""
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, -1].float()


def objective_value(full: torch.Tensor, pruned: torch.Tensor) -> float:
    """Sum of cosine similarities (NaN counts 0, as the official code)."""
    cos = torch.nn.functional.cosine_similarity(full, pruned, dim=-1)
    return float(torch.nan_to_num(cos, nan=0.0).sum())


def _prune(trial: Any, reason: str) -> float:
    """Prune ``trial`` with ``reason`` kept for the progress line (optuna does not keep the exception's)."""
    import optuna

    trial.set_user_attr("pruned", reason)
    raise optuna.TrialPruned(reason)


def tune_vflowopt(
    model: Any,
    batches: Sequence[Any],
    *,
    budget: float,
    trials: int,
    llm_layers: Sequence[int] = (9, 18),
    layers_of: int = 28,
    vision_layer: int | None = None,
    seed: int = 42,
    startup_trials: int | None = None,
    timeout: float | None = None,
    budget_tolerance: float = 0.01,
    progress: Callable[[str], None] | None = None,
) -> tuple[VFlowOptConfig, float]:
    """Search the VFlowOpt config of ``budget`` that keeps the last-token state closest to the full model's.

    ``batches``: processor outputs (on the model's device). ``progress``: one line per finished trial, whatever
    its end (completed with its objective, pruned with the reason, failed with the error). Returns (best config,
    best objective).
    """
    import optuna

    import mmeff

    n_layers = len(mmeff.families.adapter_for(model).layers)
    layers = scale_layers(llm_layers, layers_of, n_layers)
    if len(layers) != 2:
        raise ConfigError("the tuner searches two LLM stages (r_1 searched, r_2 from the budget), as the paper")
    with torch.no_grad():
        full = [last_token_state(model, b) for b in batches]
    space = search_space(budget)

    def objective(trial: optuna.Trial) -> float:
        p = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in space.items() if name != "r_1"}
        lo, hi = r1_interval(budget, p["r_v"], layers, n_layers)
        lo, hi = max(lo, space["r_1"][0]), min(hi, space["r_1"][1])
        if lo > hi:
            return _prune(trial, f"no r_1 in the search box meets the budget with r_v={p['r_v']:.4f}")
        p["r_1"] = lo + trial.suggest_float("r_1_share", 0.0, 1.0) * (hi - lo)  # position inside the interval
        trial.set_user_attr("r_1", p["r_1"])
        r2 = solve_last_ratio(budget, p["r_v"], layers, [p["r_1"], 0.0], n_layers)
        r2 = min(max(r2, 0.0), 1.0)  # rounding only: r_1 lies in the feasible interval
        cfg = VFlowOptConfig(vision_layer=vision_layer, t=p["t"], m=p["m"], r_v=p["r_v"], alpha_v=p["alpha_v"],
                             llm_layers=tuple(layers), llm_ratios=(p["r_1"], r2), layers_of=0)
        total = 0.0
        kept = n_in = 0.0
        with torch.no_grad(), mmeff.wrap(model, cfg) as handle:
            for b, ref in zip(batches, full):
                total += objective_value(ref, last_token_state(model, b))
                kept += handle.stats["visual_tokens_kept"]
                n_in += handle.stats["visual_tokens_in"]
        removed = 1.0 - kept / max(n_in, 1e-9)  # measured, recycled cell tokens included
        trial.set_user_attr("r_2", r2)
        trial.set_user_attr("removed", removed)
        if removed < budget - budget_tolerance:
            return _prune(trial, f"keeps {1 - removed:.3f} of the visual tokens (recycled cells counted)")
        return total

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is None:
            return
        head = f"trial {trial.number + 1}/{trials}"
        state = trial.state.name.lower()
        if trial.state == optuna.trial.TrialState.COMPLETE:
            best = study.best_value
            progress(f"{head} completed: objective {trial.value:.4f} (best {best:.4f})")
        elif trial.state == optuna.trial.TrialState.PRUNED:
            progress(f"{head} pruned: {trial.user_attrs.get('pruned', 'no reason given')}")
        else:
            progress(f"{head} {state}: {trial.user_attrs.get('error', 'see the log above')}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = startup_trials if startup_trials is not None else min(27, max(1, trials // 3))
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    # timeout: stop after the trial in flight; a failing trial is reported and the search goes on
    study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[report], catch=(RuntimeError,))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    if failed and not done:
        raise ConfigError(f"all {len(failed)} tuning trials failed; the first: "
                          f"{failed[0].system_attrs.get('fail_reason', 'unknown error')}")
    if not done:
        raise ConfigError(f"no tuning trial met the budget {budget} constraint in {trials} trials; use more trials")
    best = max(done, key=lambda t: t.value)
    p = best.params
    cfg = VFlowOptConfig(vision_layer=vision_layer, t=p["t"], m=p["m"], r_v=p["r_v"], alpha_v=p["alpha_v"],
                         llm_layers=tuple(layers), llm_ratios=(best.user_attrs["r_1"], best.user_attrs["r_2"]),
                         layers_of=0)
    assert abs(1.0 - kept_fraction(cfg.r_v, layers, cfg.llm_ratios, n_layers) - budget) < 1e-6
    return cfg, float(best.value)
