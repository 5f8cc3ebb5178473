"""A slow reference of PAI's released logic and its FIA fork (LALBJ/PAI, hasanar1f/PAINT), shared by
``test_pai.py`` and ``test_fia.py``: written from the released code, not from mmeff.

Greedy decoding recomputes the whole sequence at every step with its own attention function: eager softmax
attention where the pre-softmax scores of chosen query rows get ``a + g_j |a|`` on key j (``g`` per key: PAI's
alpha on the image tokens, FIA's alpha / beta on its top / bottom tokens) in layers >= ``start``. The rows are
those the released code patches when it decodes with a KV cache — each step's last row: every generated token
fed back (steps >= 1), and the prompt's last row (the first step) only when CFG's first step does not switch
the patch off. The no-image prompt is recomputed likewise, never patched. CFG and its cutoff are written out
here, not imported.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

REF = "mmeff_test_cfg_reference"
_PATCH: dict = {"rows": None, "gain": None, "start": 2, "heads": None}


def eager_scores(query, key, value, attention_mask, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-softmax scores with the mask added, values with their KV heads repeated): eager attention's first half,
    shared by the slow references (they differ in what they do to the scores or probabilities)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    return scores, value


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the released patch: rows ``_PATCH["rows"]`` x keys weighted by ``_PATCH["gain"]``."""
    scores, value = eager_scores(query, key, value, attention_mask, scaling)
    rows, gain = _PATCH["rows"], _PATCH["gain"]
    if rows is not None and module.layer_idx >= _PATCH["start"]:
        g = rows[:, None, :, None].to(scores.dtype) * gain[:, None, None, :].to(scores.dtype)  # [B, 1, q, k]
        if _PATCH["heads"] is not None:  # FIA's head rule (ours): g x min(v_h / mean_h v, cap), per row
            visual, cap = _PATCH["heads"]
            share = (torch.softmax(scores.float(), -1) * visual[:, None, None, :]).sum(-1)  # [B, H, q]
            g = g * (share / share.mean(1, keepdim=True).clamp_min(1e-12)).clamp(max=cap)[..., None].to(scores.dtype)
        scores = scores + g * scores.abs()
    probs = torch.softmax(scores.float(), -1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REF, _reference_attention)
AttentionMaskInterface.register(REF, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def step_inputs(inputs: dict, new: torch.Tensor) -> dict:
    """``inputs`` with the tokens generated so far appended (as generate feeds the unwrapped model)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], new], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)
    if "image_grid_thw" not in inputs:  # LLaVA families: positions from the padding mask
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return out


@torch.no_grad()
def reference_logits(model, inputs: dict, rows: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                     start: int = 2, heads: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Last-position logits of a full recompute with the patch on ``rows`` [B, n] x ``gain`` [B, n] (None:
    unpatched); ``heads`` = (visual keys [B, n], cap): FIA's head-specific factors."""
    text = model.get_decoder().config if hasattr(model, "get_decoder") else model.config
    old = text._attn_implementation
    _PATCH.update(rows=rows, gain=gain, start=start, heads=heads)
    text._attn_implementation = REF
    try:
        return model(**inputs, use_cache=False).logits[:, -1].float()
    finally:
        text._attn_implementation = old
        _PATCH.update(rows=None, gain=None, heads=None)


def cfg(main: torch.Tensor, side: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """The released CFG processor: ``gamma (lp - lq) + lq``, -inf where ``lp < log(cutoff) + max lp``."""
    lp, lq = main.log_softmax(-1), side.log_softmax(-1)
    out = gamma * (lp - lq) + lq
    return out.masked_fill(lp < math.log(cutoff) + lp.max(-1, keepdim=True).values, float("-inf"))


def patched_rows(n_prompt: int, total: int, batch: int, first_step: bool) -> torch.Tensor:
    """[B, total] the rows the released code patches: every generated token fed back, and the prompt's last row
    when the first step is patched."""
    rows = torch.zeros(batch, total, dtype=torch.bool)
    rows[:, n_prompt:] = True
    if first_step:
        rows[:, n_prompt - 1] = True
    return rows


@contextlib.contextmanager
def peaky(model, factor: float = 60.0):
    """Sharpen the tiny model's output distribution (a random model's is nearly flat, where the plausibility
    cutoff removes nothing) by scaling its LM head; restored afterwards."""
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    head.data.mul_(factor)
    try:
        yield
    finally:
        head.data.copy_(saved)
