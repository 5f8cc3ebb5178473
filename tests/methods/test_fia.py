"""FIA against an independent slow reference of its release (hasanar1f/PAINT, a PAI fork), on LLaVA-1.5 (the
only family the release supports): the dual-stream selection recomputed from the eager CLIP tower's attentions
as the release does it (CLS row summed over heads, numpy percentiles for the IQR), the modulation and PAI's CFG
from ``tests/methods/cfg_reference.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmeff
from mmeff.errors import ConfigError
from mmeff_lab.models.factory import load_tiny
from tests.helpers import batch
from tests.methods.cfg_reference import cfg, patched_rows, peaky, reference_logits, step_inputs

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    return load_tiny(tiny_model_dir("llava"), attn_implementation="eager")


def released_streams(model, inputs, local_ratio: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom) [B, n] over prompt positions, per image as the release's ``update_modpai_alpha`` selects
    for its one image: top-k of layer 0's CLS row, minus the IQR outliers of layer -2's CLS row."""
    att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    ids = inputs["input_ids"]
    top = torch.zeros_like(ids, dtype=torch.bool)
    bottom = torch.zeros_like(top)
    for b in range(ids.shape[0]):
        local = att[0][b, :, 0, 1:].sum(0)
        glob = att[-2][b, :, 0, 1:].sum(0)
        n = local.numel()
        g = glob.detach().numpy()
        q1, q3 = np.percentile(g, 25), np.percentile(g, 75)
        ratio = float((g > q3 + 1.5 * (q3 - q1)).sum()) / n
        t = set(torch.topk(local, int(n * local_ratio)).indices.tolist())
        bt = set(torch.topk(glob, int(n * ratio)).indices.tolist())
        pos = (ids[b] == model.config.image_token_id).nonzero().flatten()
        top[b, pos[sorted(t - bt)]] = True
        bottom[b, pos[sorted(bt)]] = True
    return top, bottom


def _check(model, inputs, preset: str, overrides: dict, alpha: float, beta: float, gamma: float,
           first_step: bool, heads: float | None) -> int:
    top, bottom = released_streams(model, inputs)
    assert top.any() and bottom.any()  # both streams act
    with mmeff.wrap(model, preset, **overrides) as handle:
        out = model.generate(**inputs, **GEN)
        data = handle.pipeline.methods[0].data(handle.pipeline.state)
        side = None if data.side is None else dict(data.side.inputs)
    n = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == model.config.image_token_id
    cut = 0
    for step in range(GEN["max_new_tokens"]):
        new = out.sequences[:, n: n + step]
        pad = torch.zeros_like(new, dtype=torch.bool)
        gain = alpha * torch.cat([top, pad], 1).float() + beta * torch.cat([bottom, pad], 1).float()
        rows = patched_rows(n, n + step, len(new), first_step)
        head_rule = None if heads is None else (torch.cat([image, pad], 1).float(), heads)
        want = reference_logits(model, step_inputs(inputs, new), rows, gain, 2, head_rule)
        if gamma != 1.0:
            want = cfg(want, reference_logits(model, step_inputs(side, new)), gamma, 0.1)
        got = out.logits[step].float()
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin), step
        cut += int((~fin).sum())
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    return cut


@torch.no_grad()
def test_fia_equals_the_released_logic(llava):
    """``fia``: the release's CHAIR settings (alpha 0.9, beta 0.3, uniform), CFG gamma 1.1 with the cutoff, the
    first token plain CFG; with gamma 1 (no CFG) the first step is modulated too."""
    model, processor = llava
    inputs = batch(processor, "llava", multi_image=False)
    with peaky(model):
        cut = _check(model, inputs, "fia", {}, 0.9, 0.3, 1.1, first_step=False, heads=None)
        _check(model, inputs, "fia", {"gamma": 1.0}, 0.9, 0.3, 1.0, first_step=True, heads=None)
    assert cut > 0  # the cutoff removed tokens, so it is pinned too


@torch.no_grad()
def test_fia_heads_equals_its_reference(llava):
    """``fia-heads`` (ours): every step modulated, per-head factors min(v_h / mean v, 2) from each row's own
    unmodified attention; a cap of 1e9 is the unbounded rule."""
    model, processor = llava
    inputs = batch(processor, "llava", multi_image=False)
    with peaky(model):
        _check(model, inputs, "fia-heads", {}, 0.7, 0.3, 1.1, first_step=True, heads=2.0)
        _check(model, inputs, "fia-heads", {"head_cap": 1.0}, 0.7, 0.3, 1.1, first_step=True, heads=1.0)
        _check(model, inputs, "fia-heads", {"head_cap": 1e9, "gamma": 1.0}, 0.7, 0.3, 1.0, first_step=True,
               heads=1e9)
        first = []
        for cap in (1.0, 1e9):  # the bound binds on this model
            with mmeff.wrap(model, "fia-heads", head_cap=cap, gamma=1.0):
                first.append(model(**inputs).logits[:, -1])
        assert not torch.allclose(first[0], first[1])


@torch.no_grad()
def test_fia_first_token_is_plain_cfg_as_released(llava):
    """One-word answers (POPE): the released FIA's first token does not depend on alpha / beta."""
    model, processor = llava
    inputs = batch(processor, "llava", multi_image=False)
    first = []
    for ov in ({}, {"alpha": 0.0, "beta": 0.0}, {"reading": "text"}):
        with mmeff.wrap(model, "fia", **ov):
            first.append(model(**inputs).logits[:, -1])
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    assert not torch.allclose(first[0], first[2])


def test_fia_refuses_bad_settings(llava):
    model, _ = llava
    for ov, msg in (({"head_cap": 0.5}, "head_cap"), ({"alpha": -1.0}, "alpha"), ({"gamma": 0.0}, "gamma"),
                    ({"reading": "paper"}, "reading"), ({"cutoff": 2.0}, "cutoff")):
        with pytest.raises(ConfigError, match=msg):
            mmeff.wrap(model, "fia", **ov)
