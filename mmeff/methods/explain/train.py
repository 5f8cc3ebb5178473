"""Relevance of visual tokens (Chefer et al. 2021) and training of the first-layer-attention mapper.

Relevance rule (gradient-weighted attention, "Generic Attention-model Explainability", Chefer et al. ICCV
2021, self-attention rule). With ``A_l`` [H, N, N] the softmax attention of decoder layer l and
``G_l = ∂y/∂A_l``::

    R_0 = I_N
    R_{l+1} = R_l + mean_h (G_l ⊙ A_l)^+ · R_l          for l = 0 .. L-1 (forward order)
    relevance_j = sum_{i in rows} R_L[i, j]

``y`` = sum of the logits of the answer tokens at the positions that predict them (teacher forcing), and
``rows`` are those positions, so a visual token's relevance is its relevance to the whole answer. The
attention maps come from an eager forward (the text decoder switched to eager attention for the call).

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
from mmeff.methods._teacher import Batch, Example, make_batch
from mmeff.methods.explain.method import RelevanceMapper, channels_from_probs, normalise, probe_weights, tile_positions

Progress = Callable[[int, int, dict[str, float]], None]
Pair = tuple[torch.Tensor, torch.Tensor]  # ([CHANNELS, rows, cols] probe maps, [rows, cols] relevance)


def chefer_rule(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, N] relevance matrix R_L from per-layer attention probabilities and their gradients [B, H, N, N]."""
    b, _, n, _ = attentions[0].shape
    r = torch.eye(n, device=attentions[0].device).expand(b, n, n)
    for a, g in zip(attentions, grads):
        cam = (g.float() * a.float()).clamp_min(0).mean(1)
        r = r + cam @ r
    return r


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


def relevance_and_channels(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relevance [B, N], layer-0 probe channels [B, CHANNELS, N], visual [B, N]) of a teacher-forced batch."""
    if handle_of(model) is not None:
        raise MmeffError("train explain needs the unwrapped model; call mmeff.unwrap(model) first")
    adapter = adapter_for(model)
    # frozen weights would give attention maps outside the graph: start one at the input embeddings
    model.enable_input_require_grads()
    try:
        with eager_text(model), torch.enable_grad():
            out = model(**batch.inputs, use_cache=False, output_attentions=True)
            logits = out.logits
            atts = list(out.attentions)
            if len(atts) != len(adapter.layers):
                raise MmeffError(f"expected {len(adapter.layers)} decoder attention maps, got {len(atts)}")
            picked = torch.gather(logits, 2, batch.targets[..., None])[..., 0]
            y = (picked * batch.rows).sum()
            grads = torch.autograd.grad(y, atts)
    finally:
        model.disable_input_require_grads()
    with torch.no_grad():
        r = chefer_rule([a.detach() for a in atts], list(grads))
        rel = torch.einsum("bi,bij->bj", batch.rows.float(), r)
        spans = adapter.spans(batch.prompt["input_ids"], batch.prompt)
        n = batch.inputs["input_ids"].shape[1]
        visual = torch.zeros(len(spans), n, dtype=torch.bool, device=rel.device)
        for b, sample in enumerate(spans):
            for sp in sample:
                visual[b, sp.start : sp.end] = True
        weights = probe_weights(visual, batch.inputs["attention_mask"], batch.prompt_len)
        channels = channels_from_probs(atts[0].detach(), weights)
    return rel, channels, visual


def collect_pairs(model: Any, processor: Any, examples: Iterator[Example], samples: int, batch_size: int,
                  progress: Progress | None = None) -> list[Pair]:
    """Per image tile: (normalised probe maps, normalised relevance map)."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pairs: list[Pair] = []
    done = 0
    while done < samples:
        exs = [next(examples) for _ in range(min(batch_size, samples - done))]
        batch = make_batch(processor, exs, device, dtype)
        rel, channels, _ = relevance_and_channels(model, batch)
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
    """Fit a mapper to collected pairs; report the held-out MSE and top-50% overlap (mapper vs. the first-layer
    attention itself, channel 0, as the no-training baseline)."""
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
        report = {
            "tiles_train": len(train),
            "tiles_heldout": len(held),
            "heldout_mse": sum(F.mse_loss(p, y).item() for p, (_, y) in zip(preds, held)) / len(held),
            "heldout_top50_overlap": sum(keep_overlap(p, y) for p, (_, y) in zip(preds, held)) / len(held),
            "attention_top50_overlap": sum(keep_overlap(x[0], y) for x, y in held) / len(held),
        }
    return mapper, report


def train_explain(model: Any, processor: Any, examples: Iterator[Example], *, steps: int, samples: int = 256,
                  batch_size: int = 4, lr: float = 3e-3, width: int = 16, depth: int = 3, seed: int = 0,
                  progress: Progress | None = None, collect_progress: Progress | None = None
                  ) -> tuple[RelevanceMapper, dict[str, Any]]:
    pairs = collect_pairs(model, processor, examples, samples, batch_size, collect_progress)
    mapper, report = fit_mapper(pairs, steps=steps, lr=lr, width=width, depth=depth, seed=seed, progress=progress)
    report["samples"] = samples
    report["steps"] = steps
    return mapper, report


def head_tensors(mapper: RelevanceMapper) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in mapper.state_dict().items()}
