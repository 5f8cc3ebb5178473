"""Training of the DyVTE routers on a frozen VLM, with labels built on the fly.

Each step takes a fresh teacher-forced batch (prompt + answer) and labels it for the exit layers of the step
(``exit_layers``: ``"all"`` — ours, every ``k`` in ``min_layer .. L-1``: one rendered batch serves all routers,
and image making, not the tiny forwards, dominates a step; ``"one"`` — the paper and its released code, one
``k`` drawn uniformly per step), all as single prefill forwards without cache:

* full: the unchanged model, once; pre-hooks on the layers record the hidden states entering each ``k`` (the
  routers' inputs, :func:`mmeff.methods.dyvte.router_features` on the prompt part);
* exit at ``k``: the same batch through the mmeff pipeline with a temporary method (:class:`ForcedExit`) whose
  keep mask before layer ``k`` drops every visual slot — exactly what an exit at ``k`` does at inference.

:func:`exit_labels` turns the two into labels: exit = 1 iff the greedy answer-token predictions agree on
more than ``agree`` (0.99) of the answer positions and the answer loss is below ``tol`` (1.03) x the full
loss. The loss is the mean over the step's layers of router ``k``'s cross-entropy; every other parameter stays
frozen. Optimiser: AdamW (weight decay 0), learning rate ``lr · f(s)`` with :func:`warmup_cosine` (``warmup``:
share of the steps with a linear warm-up; the released code, DoubtedSteam/DyVTE
``scripts/v1_5/finetune_visual_gate.sh``, uses lr 6e-5, warm-up ratio 0.03, cosine, global batch 8 x 16).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from mmeff.api import handle_of
from mmeff.config import MethodConfig
from mmeff.engine.method import Method, Point
from mmeff.engine.pipeline import Pipeline
from mmeff.engine.state import State
from mmeff.errors import MmeffError
from mmeff.families import adapter_for
from mmeff.methods._teacher import Batch, Example, make_batch
from mmeff.methods.dyvte.method import DyVTERouters, router_features, text_after_image

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class _ForcedExitConfig(MethodConfig):
    method: ClassVar[str] = "dyvte-forced-exit"  # never registered: used only inside the trainer
    layer: int = 1


class ForcedExit(Method):
    """Drops every visual slot of every sample before decoder layer ``config.layer``."""

    points = frozenset({Point.LAYER})
    config: _ForcedExitConfig

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer != self.config.layer:
            return None
        return ~state.visual_in_group(state.group)


@contextlib.contextmanager
def forced_exit(model: Any, layer: int) -> Iterator[None]:
    """The model with all visual tokens removed from decoder layer ``layer`` on (a temporary pipeline)."""
    if handle_of(model) is not None:
        raise MmeffError("train dyvte needs the unwrapped model; call mmeff.unwrap(model) first")
    adapter = adapter_for(model)
    pipeline = Pipeline(model, adapter, [ForcedExit(_ForcedExitConfig(layer=layer), adapter)])
    pipeline.attach()
    try:
        yield
    finally:
        pipeline.detach()


def answer_loss(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] mean cross-entropy of the answer tokens (rows: positions predicting them)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    w = rows.float()
    return (ce * w).sum(1) / w.sum(1).clamp_min(1.0)


def exit_labels(full_logits: torch.Tensor, exit_logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                agree: float = 0.99, tol: float = 1.03, abs_tol: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[B] long labels (1 = exit is harmless) and the per-sample measurements they come from.

    ``abs_tol`` (nats, default 0 = the paper's rule) loosens the loss test to ``tol * full + abs_tol``: for a
    model whose answers are near-certain (full loss ~1e-3) a 3% relative rise is noise, and without it almost
    every exit is labelled harmful even when every answer token is unchanged.
    """
    w = rows.float()
    same = (full_logits.argmax(-1) == exit_logits.argmax(-1)).float()
    agreement = (same * w).sum(1) / w.sum(1).clamp_min(1.0)
    loss_full = answer_loss(full_logits, rows, targets)
    loss_exit = answer_loss(exit_logits, rows, targets)
    label = (agreement > agree) & (loss_exit < tol * loss_full + abs_tol)
    return label.long(), {"agreement": agreement, "loss_full": loss_full, "loss_exit": loss_exit}


def prompt_features(hidden: torch.Tensor, batch: Batch, visual: torch.Tensor) -> torch.Tensor:
    """Router features of the prompt part of a teacher-forced batch (what the router sees at inference)."""
    n = batch.prompt_len
    text = text_after_image(visual[:, :n], batch.prompt["attention_mask"])
    last = torch.full((hidden.shape[0],), n - 1, device=hidden.device)
    return router_features(hidden[:, :n], text, last)


@torch.no_grad()
def build_step(model: Any, batch: Batch, layers: list[int], abs_tol: float = 0.0
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """layer -> (router features, labels, measurements) of one batch for an exit at each of ``layers``."""
    adapter = adapter_for(model)
    out = model(**batch.inputs, use_cache=False, output_hidden_states=True)
    full = out.logits
    captured = {k: out.hidden_states[k] for k in layers}  # hidden_states[k]: what decoder layer k receives
    spans = adapter.spans(batch.prompt["input_ids"], batch.prompt)
    visual = torch.zeros_like(batch.prompt["input_ids"], dtype=torch.bool)
    for b, sample in enumerate(spans):
        for sp in sample:
            visual[b, sp.start : sp.end] = True
    out = {}
    for k in layers:
        with forced_exit(model, k):
            gone = model(**batch.inputs, use_cache=False).logits
        labels, info = exit_labels(full, gone, batch.rows, batch.targets, abs_tol=abs_tol)
        out[k] = (prompt_features(captured[k], batch, visual), labels, info)
    return out


EXIT_LAYERS = {"all": "ours: every exit layer labelled on each batch",
               "one": "paper / released code: one exit layer drawn uniformly per step"}


def warmup_cosine(steps: int, warmup: float = 0.0) -> Callable[[int], float]:
    """Learning-rate factor of step ``s`` (0-based): with ``w = ceil(warmup · steps)`` warm-up steps,
    ``f(s) = s / w`` for ``s < w``, then ``f(s) = (1 + cos(π (s - w) / (steps - w))) / 2`` — the schedule of
    transformers' ``get_cosine_schedule_with_warmup`` that the released code's ``warmup_ratio`` selects;
    ``warmup = 0`` is plain cosine decay from the full rate."""
    if steps < 1:
        raise MmeffError(f"train dyvte: steps must be >= 1, got {steps}")
    if not 0.0 <= warmup < 1.0:
        raise MmeffError(f"train dyvte: warmup is a share of the steps in [0, 1), got {warmup}")
    w = math.ceil(warmup * steps)

    def factor(s: int) -> float:
        if s < w:
            return s / w
        rest = max(steps - w, 1)
        return 0.5 * (1 + math.cos(math.pi * min(s - w, rest) / rest))

    return factor


def train_dyvte(model: Any, processor: Any, examples: Iterator[Example], *, steps: int, batch_size: int = 4,
                lr: float = 6e-5, width: int = 2048, min_layer: int = 1, seed: int = 0, abs_tol: float = 0.0,
                warmup: float = 0.0, exit_layers: str = "all", progress: Progress | None = None
                ) -> tuple[DyVTERouters, dict[str, Any]]:
    """Train a router set for ``model``; returns it and a report (label rates per layer, final losses).

    ``warmup`` (share of the steps, the paper's code 0.03) and ``exit_layers`` (``"all"`` or ``"one"``, see the
    module doc) select between our settings (the defaults) and the paper's."""
    adapter = adapter_for(model)
    n_layers = len(adapter.layers)
    if not 1 <= min_layer < n_layers:
        raise MmeffError(f"train dyvte: min_layer must be in [1, {n_layers - 1}], got {min_layer}")
    if exit_layers not in EXIT_LAYERS:
        raise MmeffError(f"train dyvte: exit_layers must be one of {', '.join(EXIT_LAYERS)}, got {exit_layers!r}")
    schedule = warmup_cosine(steps, warmup)
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    routers = DyVTERouters(int(adapter.text_config.hidden_size), n_layers, width).to(device)
    opt = torch.optim.AdamW(routers.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    layers = list(range(min_layer, n_layers))
    seen = {k: [0, 0] for k in layers}  # layer -> [exit labels, samples]
    hits = {k: [0, 0] for k in layers}  # layer -> [router correct, samples]
    loss_sum = 0.0
    for step in range(steps):
        batch = make_batch(processor, [next(examples) for _ in range(batch_size)], device, dtype)
        step_layers = layers if exit_layers == "all" else [rnd.choice(layers)]
        per_layer = build_step(model, batch, step_layers, abs_tol)
        losses = []
        for k, (feats, labels, _) in per_layer.items():
            logits = routers(k, feats)
            losses.append(F.cross_entropy(logits.float(), labels))
            seen[k][0] += int(labels.sum())
            seen[k][1] += len(labels)
            hits[k][0] += int((logits.argmax(-1) == labels).sum())
            hits[k][1] += len(labels)
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item()
        if progress is not None:
            rate = sum(int(v[1].sum()) for v in per_layer.values()) / (len(step_layers) * batch_size)
            progress(step + 1, steps, {"loss": loss.item(), "exit_rate": rate})
    report = {
        "steps": steps,
        "warmup": warmup,
        "exit_layers": exit_layers,
        "mean_loss": loss_sum / max(steps, 1),
        "exit_label_rate": {k: (v[0] / v[1] if v[1] else None) for k, v in seen.items()},
        "router_train_accuracy": {k: (v[0] / v[1] if v[1] else None) for k, v in hits.items()},
    }
    return routers.eval(), report


def head_tensors(routers: DyVTERouters) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in routers.state_dict().items()}
