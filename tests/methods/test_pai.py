"""PAI against an independent slow reference written from the released code's logic (LALBJ/PAI).

The reference decodes greedily by recomputing the whole sequence at every step, with its own attention function:
eager softmax attention where the pre-softmax scores of chosen query rows get ``a + alpha |a|`` on the image
tokens' columns in layers [2, L). The rows are those the released code patches when it decodes with a KV cache —
each step's last row: every generated token fed back (steps >= 1), and the prompt's last row (the first step) only
when the amplification is not switched off by CFG's first step (``reading="text"``, or gamma = 1). The no-image
prompt is recomputed likewise, never amplified. CFG and its cutoff are written out here, not imported.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import mmeff
from mmeff.methods._halluc import text_only_inputs
from tests.helpers import batch

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
REF = "mmeff_test_pai_reference"
_ROWS: dict[str, torch.Tensor | None] = {"rows": None, "keys": None}
ALPHA, GAMMA, CUTOFF, START = 0.2, 1.1, 0.1, 2


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the released patch on the rows in ``_ROWS`` (layers >= START)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    rows, keys = _ROWS["rows"], _ROWS["keys"]
    if rows is not None and module.layer_idx >= START:
        pick = rows[:, None, :, None] & keys[:, None, None, :]  # [B, 1, q, k]
        scores = torch.where(pick, scores + ALPHA * scores.abs(), scores)
    probs = torch.softmax(scores.float(), -1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REF, _reference_attention)
AttentionMaskInterface.register(REF, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _image_flags(model, ids: torch.Tensor) -> torch.Tensor:
    return ids == model.config.image_token_id


def _step_inputs(inputs: dict, new: torch.Tensor) -> dict:
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
def _reference_logits(model, inputs: dict, rows: torch.Tensor | None) -> torch.Tensor:
    """Last-position logits of a full recompute with the patch on ``rows`` [B, n] (None: unpatched)."""
    text = model.get_decoder().config if hasattr(model, "get_decoder") else model.config
    old = text._attn_implementation
    _ROWS["rows"], _ROWS["keys"] = rows, None if rows is None else _image_flags(model, inputs["input_ids"])
    text._attn_implementation = REF
    try:
        return model(**inputs, use_cache=False).logits[:, -1].float()
    finally:
        text._attn_implementation = old
        _ROWS["rows"] = _ROWS["keys"] = None


def _cfg(main: torch.Tensor, side: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    lp, lq = main.log_softmax(-1), side.log_softmax(-1)
    out = gamma * (lp - lq) + lq
    return out.masked_fill(lp < math.log(cutoff) + lp.max(-1, keepdim=True).values, float("-inf"))


@contextlib.contextmanager
def _peaky(model, factor: float = 60.0):
    """Sharpen the tiny model's output distribution (a random model's is nearly flat, where the plausibility
    cutoff removes nothing) by scaling its LM head; restored afterwards."""
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    head.data.mul_(factor)
    try:
        yield
    finally:
        head.data.copy_(saved)


@torch.no_grad()
@pytest.mark.parametrize("reading", ["released", "text"])
def test_pai_equals_the_released_logic(models, reading):
    family, eager, _, processor = models
    with _peaky(eager):
        _check_against_reference(eager, processor, family, reading)


def _check_against_reference(eager, processor, family: str, reading: str) -> None:
    inputs = batch(processor, family, multi_image=False)
    cut = 0
    with mmeff.wrap(eager, "pai" if reading == "released" else "pai-text") as handle:
        assert handle.configs[0].cutoff == CUTOFF and handle.configs[0].alpha == ALPHA
        out = eager.generate(**inputs, **GEN)
        state = handle.pipeline.state
        side = dict(handle.pipeline.methods[0].data(state).side.inputs)
    pad = eager.config.get_text_config().pad_token_id
    want_side = text_only_inputs(state, inputs, 0 if pad is None else int(pad))
    assert torch.equal(side["input_ids"], want_side["input_ids"])
    n = inputs["input_ids"].shape[1]
    for step in range(GEN["max_new_tokens"]):
        new = out.sequences[:, n: n + step]
        main_in = _step_inputs(inputs, new)
        rows = torch.zeros_like(main_in["input_ids"], dtype=torch.bool)
        rows[:, n:] = True  # every generated token was the last row of a step >= 1
        if reading == "text":
            rows[:, n - 1] = True  # the first step's last row: amplified unless CFG switched the patch off
        main = _reference_logits(eager, main_in, rows)
        side_in = _step_inputs({k: v for k, v in side.items()}, new)
        no_image = _reference_logits(eager, side_in, None)
        want = _cfg(main, no_image, GAMMA, CUTOFF)
        got = out.logits[step].float()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), step
        fin = torch.isfinite(want)
        cut += int((~fin).sum())
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert cut > 0  # the cutoff removed tokens, so it is pinned too


@torch.no_grad()
def test_released_pai_answers_the_first_token_with_cfg_only(models):
    """One-word answers (POPE): the released PAI's first token is plain CFG (no amplification), the paper
    reading's is not; without CFG (gamma 1) the released code amplifies the first step too."""
    family, eager, _, processor = models
    inputs = batch(processor, family, multi_image=False)
    first = {}
    for preset, overrides in (("pai", {}), ("pai-text", {}), ("pai", {"alpha": 0.0})):
        with mmeff.wrap(eager, preset, **overrides):
            first[(preset, overrides.get("alpha"))] = eager(**inputs).logits[:, -1]
    torch.testing.assert_close(first[("pai", None)], first[("pai", 0.0)], rtol=0, atol=0)
    assert not torch.allclose(first[("pai-text", None)], first[("pai", None)])
    with mmeff.wrap(eager, "pai", gamma=1.0):
        amplified = eager(**inputs).logits[:, -1]
    with mmeff.wrap(eager, "none"):
        plain = eager(**inputs).logits[:, -1]
    assert not torch.allclose(amplified, plain)
