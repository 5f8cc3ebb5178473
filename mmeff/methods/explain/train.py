"""Relevance of visual tokens (Chefer et al. 2021) and training of the first-layer-attention mapper.

Relevance rule (gradient-weighted attention, "Generic Attention-model Explainability", Chefer et al. ICCV
2021, self-attention rule). With ``A_l`` [H, N, N] the softmax attention of decoder layer l and
``G_l = ∂y/∂A_l`` for one scalar output ``y``::

    R_0 = I_N
    R_{l+1} = R_l + mean_h (G_l ⊙ A_l)^+ · R_l          for l = 0 .. L-1 (forward order)

so ``R_L = (I + C_{L-1}) ... (I + C_0)`` with ``C_l = mean_h (G_l ⊙ A_l)^+``, and the relevance of the tokens
to the output read at row ``i`` is ``R_L[i, :]``. Two targets (``target``):

* ``"per-token"`` (Chefer et al.; the default): one backward per answer token t, ``y_t`` = the logit of
  answer token t at the row ``i_t`` that predicts it, its own ``R_L^{(t)}`` (the positive clamp applied per
  token), and ``relevance_j = Σ_t R_L^{(t)}[i_t, j]``. For a generated answer this is Chefer's relevance of
  each output token, summed over the answer.
* ``"summed"`` (ours, fast): one backward of ``y = Σ_t y_t`` and ``relevance_j = Σ_t R_L[i_t, j]``. Because
  the clamp is taken after the gradients of all tokens are summed, this is *not* the sum of the per-token
  relevances (only equal for one-token answers); it costs one backward instead of one per answer token. The
  shipped reference heads (``lab/mmeff_lab/reference/weights/HEADS.md``) were trained on it.

``answer``: ``"teacher"`` (the example's answer, teacher-forced) or ``"greedy"`` (the model's own greedy
answer, generated first, then teacher-forced; Chefer explains the model's own output). The attention maps
come from an eager forward (the text decoder switched to eager attention for the call); row ``i`` of
``R_L`` is formed as ``e_i^T (I + C_{L-1}) ... (I + C_0)``, L vector-matrix products, never R_L itself.

Training (``mmeff train explain``): ``samples`` examples are run once to collect, per image tile, the
probe channels of layer 0 (:func:`mmeff.methods.explain.channels_from_probs`, the same statistic the method
reads at inference) and the relevance map; then the mapper is fitted for ``steps`` Adam steps to the
per-tile, mean-normalised relevance (MSE). The VLM is needed only for the collection; the fit is cheap.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from mmeff.api import handle_of
from mmeff.errors import MmeffError
from mmeff.families import adapter_for
from mmeff.methods._teacher import Batch, Example, greedy_batch, make_batch
from mmeff.methods.explain.method import RelevanceMapper, channels_from_probs, normalise, probe_weights, tile_positions

Progress = Callable[[int, int, dict[str, float]], None]
Pair = tuple[torch.Tensor, torch.Tensor]  # ([CHANNELS, rows, cols] probe maps, [rows, cols] relevance)

# relevance targets and answer sources, with their labels (the CLI and the head metadata use the keys)
TARGETS = {"per-token": "Chefer et al.: one backward per answer token, clamped per token, summed",
           "summed": "ours (fast): one backward of the summed answer logits"}
ANSWERS = {"teacher": "the example's answer, teacher-forced", "greedy": "the model's own greedy answer"}


def check_choice(name: str, value: str, choices: dict[str, str]) -> None:
    if value not in choices:
        raise MmeffError(f"train explain: {name} must be one of {', '.join(choices)}, got {value!r}")


def chefer_rule(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, N] relevance matrix R_L from per-layer attention probabilities and their gradients [B, H, N, N]."""
    b, _, n, _ = attentions[0].shape
    r = torch.eye(n, device=attentions[0].device).expand(b, n, n)
    for cam in attention_cams(attentions, grads):
        r = r + cam @ r
    return r


def attention_cams(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer ``C_l = mean_h (G_l ⊙ A_l)^+`` [B, N, N] (float32)."""
    return [(g.float() * a.float()).clamp_min(0).mean(1) for a, g in zip(attentions, grads)]


def relevance_rows(cams: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """[B, N] ``Σ_i w_i R_L[i, :]`` for row weights ``w`` [B, N], as ``w^T (I + C_{L-1}) ... (I + C_0)``."""
    v = weights.float()
    for c in reversed(cams):
        v = v + torch.einsum("bi,bij->bj", v, c)
    return v


@contextlib.contextmanager
def eager_text(model: Any) -> Iterator[None]:
    """The text decoder with eager attention for the duration (attention maps in the autograd graph)."""
    cfg = adapter_for(model).text_config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = saved


def relevance_and_channels(model: Any, batch: Batch, target: str = "per-token"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relevance [B, N], layer-0 probe channels [B, CHANNELS, N], visual [B, N]) of a teacher-forced batch;
    ``target`` as in the module doc (``"per-token"``: one backward per answer position, ``"summed"``: one)."""
    check_choice("target", target, TARGETS)
    if handle_of(model) is not None:
        raise MmeffError("train explain needs the unwrapped model; call mmeff.unwrap(model) first")
    adapter = adapter_for(model)
    # frozen weights would give attention maps outside the graph: start one at the input embeddings
    model.enable_input_require_grads()
    try:
        with eager_text(model), torch.enable_grad():
            out = model(**batch.inputs, use_cache=False, output_attentions=True)
            atts = list(out.attentions)
            if len(atts) != len(adapter.layers):
                raise MmeffError(f"expected {len(adapter.layers)} decoder attention maps, got {len(atts)}")
            picked = torch.gather(out.logits, 2, batch.targets[..., None])[..., 0] * batch.rows
            detached = [a.detach() for a in atts]
            if target == "summed":
                grads = torch.autograd.grad(picked.sum(), atts)
                rel = relevance_rows(attention_cams(detached, list(grads)), batch.rows)
            else:
                # answer token t of every sample sits at the same column (prompts left-, answers right-padded);
                # samples do not interact, so one backward per column serves the whole batch
                cols = batch.rows.any(0).nonzero().flatten().tolist()
                rel = torch.zeros(batch.rows.shape, device=batch.rows.device)
                for j, i in enumerate(cols):
                    grads = torch.autograd.grad(picked[:, i].sum(), atts, retain_graph=j + 1 < len(cols))
                    row = torch.zeros_like(rel)
                    row[:, i] = batch.rows[:, i].float()
                    rel += relevance_rows(attention_cams(detached, list(grads)), row)
    finally:
        model.disable_input_require_grads()
    with torch.no_grad():
        spans = adapter.spans(batch.prompt["input_ids"], batch.prompt)
        n = batch.inputs["input_ids"].shape[1]
        visual = torch.zeros(len(spans), n, dtype=torch.bool, device=rel.device)
        for b, sample in enumerate(spans):
            for sp in sample:
                visual[b, sp.start : sp.end] = True
        weights = probe_weights(visual, batch.inputs["attention_mask"], batch.prompt_len)
        channels = channels_from_probs(detached[0], weights)
    return rel, channels, visual


def collect_pairs(model: Any, processor: Any, examples: Iterator[Example], samples: int, batch_size: int,
                  progress: Progress | None = None, *, target: str = "per-token", answer: str = "teacher",
                  max_new_tokens: int = 64) -> list[Pair]:
    """Per image tile: (normalised probe maps, normalised relevance map); ``target`` / ``answer`` as in the
    module doc (``max_new_tokens`` bounds a greedy answer)."""
    check_choice("target", target, TARGETS)
    check_choice("answer", answer, ANSWERS)
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pairs: list[Pair] = []
    done = 0
    while done < samples:
        exs = [next(examples) for _ in range(min(batch_size, samples - done))]
        if answer == "greedy":
            batch = greedy_batch(model, processor, exs, max_new_tokens, device, dtype)
        else:
            batch = make_batch(processor, exs, device, dtype)
        rel, channels, _ = relevance_and_channels(model, batch, target)
        for b, sample in enumerate(adapter.spans(batch.prompt["input_ids"], batch.prompt)):
            for sp in sample:
                for pos in tile_positions(sp):
                    pos = pos.to(rel.device)
                    x = normalise(channels[b][:, pos].float().cpu())
                    y = normalise(rel[b][pos].float().clamp_min(0).cpu()[None])[0]
                    pairs.append((x, y))
        done += len(exs)
        if progress is not None:
            progress(done, samples, {"tiles": float(len(pairs))})
    return pairs


def keep_overlap(pred: torch.Tensor, target: torch.Tensor, keep: float = 0.5) -> float:
    """Share of the target's top ``keep`` cells that the prediction's top ``keep`` cells recover."""
    k = max(1, round(pred.numel() * keep))
    top_p = set(pred.flatten().topk(k).indices.tolist())
    top_t = set(target.flatten().topk(k).indices.tolist())
    return len(top_p & top_t) / k


def fit_mapper(pairs: list[Pair], *, steps: int, lr: float = 3e-3, tiles_per_step: int = 16, width: int = 16,
               depth: int = 3, holdout: float = 0.2, seed: int = 0, progress: Progress | None = None
               ) -> tuple[RelevanceMapper, dict[str, Any]]:
    """Fit a mapper to collected pairs; report the held-out MSE and top-50% overlap of the mapper and, as the
    no-training baselines, of the raw first-layer attention itself (channel 0: the last prompt row,
    ``attention_top50_overlap``; channel 1: the instruction rows' mean, ``attention_instr_top50_overlap``), and
    the paired per-tile gain of the mapper over channel 0 with its standard error."""
    if len(pairs) < 2:
        raise MmeffError(f"train explain: need at least 2 image tiles to fit and check the mapper, got {len(pairs)}")
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    order = list(range(len(pairs)))
    rnd.shuffle(order)
    n_hold = max(1, int(len(pairs) * holdout))
    held, train = [pairs[i] for i in order[:n_hold]], [pairs[i] for i in order[n_hold:]]
    mapper = RelevanceMapper(width, depth)
    opt = torch.optim.Adam(mapper.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for step in range(steps):
        loss = torch.zeros(())
        chosen = [train[rnd.randrange(len(train))] for _ in range(tiles_per_step)]
        for x, y in chosen:
            loss = loss + F.mse_loss(mapper(x[None])[0], y)
        loss = loss / len(chosen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, {"loss": loss.item()})
    mapper.eval()
    with torch.no_grad():
        preds = [mapper(x[None])[0] for x, _ in held]
    mine = torch.tensor([keep_overlap(p, y) for p, (_, y) in zip(preds, held)])
    base = torch.tensor([keep_overlap(x[0], y) for x, y in held])
    gain = mine - base  # paired per tile: the mapper against the attention it reads

    def se(v: torch.Tensor) -> float | None:
        return float(v.std() / math.sqrt(len(v))) if len(v) > 1 else None

    report = {
        "tiles_train": len(train),
        "tiles_heldout": len(held),
        "heldout_mse": sum(F.mse_loss(p, y).item() for p, (_, y) in zip(preds, held)) / len(held),
        "heldout_top50_overlap": float(mine.mean()),
        "attention_top50_overlap": float(base.mean()),
        "attention_instr_top50_overlap": sum(keep_overlap(x[1], y) for x, y in held) / len(held),
        "gain_vs_attention": float(gain.mean()),
        "gain_vs_attention_se": se(gain),
    }
    return mapper, report


def train_explain(model: Any, processor: Any, examples: Iterator[Example], *, steps: int, samples: int = 256,
                  batch_size: int = 4, lr: float = 3e-3, width: int = 16, depth: int = 3, seed: int = 0,
                  target: str = "per-token", answer: str = "teacher", max_new_tokens: int = 64,
                  progress: Progress | None = None, collect_progress: Progress | None = None
                  ) -> tuple[RelevanceMapper, dict[str, Any]]:
    pairs = collect_pairs(model, processor, examples, samples, batch_size, collect_progress, target=target,
                          answer=answer, max_new_tokens=max_new_tokens)
    mapper, report = fit_mapper(pairs, steps=steps, lr=lr, width=width, depth=depth, seed=seed, progress=progress)
    report.update(samples=samples, steps=steps, target=target, answer=answer)
    if answer == "greedy":
        report["max_new_tokens"] = max_new_tokens
    return mapper, report


def head_tensors(mapper: RelevanceMapper) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in mapper.state_dict().items()}
