"""Attention statistics: the torch reference against a direct softmax, the positions ("geometry") the fused
kernel uses against the masks the model really applies, and (on CUDA) the Triton kernel against the reference."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.engine.method import Method, Point, lookup
from mmeff.engine.pipeline import Pipeline
from mmeff.families import adapter_for
from mmeff.kernels import triton_available
from mmeff.kernels.attention_stats import received_attention_reference
from mmeff.methods.fastv import FastVConfig
from mmeff_lab.models.factory import FAMILIES, load_tiny
from tests.test_wrap import batch


def _visible_from_geometry(q_pos, k_pos, k_valid):
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]


def test_reference_matches_direct_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, d = 2, 4, 2, 37, 16
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :5] = False  # left padding of sample 0
    pos = torch.arange(n).expand(b, n)
    allowed = _visible_from_geometry(pos, pos, valid)
    w = torch.rand(b, n, generator=g) * valid
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * 0.25
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    want = torch.einsum("bhqk,bq->bk", probs, w) / h / w.sum(1, keepdim=True)
    got = received_attention_reference(q, k, allowed[:, None], 0.25, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_chunked = received_attention_reference(q, k, allowed[:, None], 0.25, w, chunk=8)
    torch.testing.assert_close(got_chunked, want, rtol=1e-5, atol=1e-6)


class _Probe(Method):
    """Checks, at every layer and step, that the geometry describes exactly the mask the layer applies."""

    points = frozenset({Point.LAYER})
    seen: list

    def attention_hooks(self, layer, state):
        outer = self

        class Check:
            def observe(self, call):
                q_pos, k_pos, k_valid = call.geometry
                from_geometry = _visible_from_geometry(q_pos, k_pos, k_valid)
                m = call.mask
                if m is None:
                    q, k = call.query.shape[2], call.key.shape[2]
                    m = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None]
                from_mask = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
                from_mask = from_mask.expand(from_geometry.shape[0], -1, -1, -1)[:, 0]
                # prefill: queries are the key slots, and only real tokens' rows are defined (not padding/fill);
                # decode: every query is a new token
                rows = k_valid if call.phase == "prefill" else torch.ones_like(q_pos, dtype=torch.bool)
                agree = (from_geometry == from_mask) | ~rows[:, :, None]
                outer.seen.append((call.phase, layer, bool(agree.all())))

        return [Check()]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_geometry_matches_masks_with_fastv(tiny_model_dir, family):
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    inputs = batch(processor, family)
    adapter = adapter_for(model)
    fastv = lookup("fastv")[1](FastVConfig(k=1, ratio=0.5), adapter)
    probe = _Probe(mmeff.NoneConfig(), adapter)
    probe.seen = []
    pipe = Pipeline(model, adapter, [fastv, probe])
    pipe.attach()
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        pipe.detach()
    phases = {p for p, _, _ in probe.seen}
    assert phases == {"prefill", "decode"}
    assert all(ok for _, _, ok in probe.seen), [s for s in probe.seen if not s[2]]


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 32, 32, 576 + 40, 128), (3, 8, 2, 333, 64), (2, 4, 4, 1000, 80)])
def test_triton_kernel_matches_reference(dtype, tol, shape):
    from mmeff.kernels.attention_stats.triton import received_attention_triton

    b, h, hkv, n, d = shape
    for seed in range(2):  # fresh inputs each time
        g = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
        k = torch.randn(b, hkv, n, d, device="cuda", generator=g).to(dtype)
        valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
        valid[0, : n // 7] = False  # left padding
        if b > 1:
            valid[1, n // 2 : n // 2 + 9] = False  # fill slots in the middle
        pos = torch.arange(n, device="cuda").expand(b, n)
        w = torch.rand(b, n, device="cuda", generator=g) * valid
        mask = _visible_from_geometry(pos, pos, valid)[:, None]
        want = received_attention_reference(q.double(), k.double(), mask, d**-0.5, w.double()).float()
        got = received_attention_triton(q, k, pos, pos, valid, d**-0.5, w)
        assert torch.isfinite(got).all()
        err = (got - want).norm() / want.norm()
        assert err < tol, (dtype, shape, float(err))
