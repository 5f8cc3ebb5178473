"""Attention statistics: the torch reference against a direct softmax, the positions ("geometry") the fused
kernel uses against the masks the model really applies, and (on CUDA) the Triton kernel against the reference."""

from __future__ import annotations

import pytest
import torch

from mmeff.kernels import triton_available
from mmeff.kernels.attention_stats import received_attention_reference
from tests.helpers import visible_from_geometry


def test_reference_matches_direct_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, d = 2, 4, 2, 37, 16
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :5] = False  # left padding of sample 0
    pos = torch.arange(n).expand(b, n)
    allowed = visible_from_geometry(pos, pos, valid)
    w = torch.rand(b, n, generator=g) * valid
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * 0.25
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    want = torch.einsum("bhqk,bq->bk", probs, w) / h / w.sum(1, keepdim=True)
    got = received_attention_reference(q, k, allowed[:, None], 0.25, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_chunked = received_attention_reference(q, k, allowed[:, None], 0.25, w, chunk=8)
    torch.testing.assert_close(got_chunked, want, rtol=1e-5, atol=1e-6)


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
        mask = visible_from_geometry(pos, pos, valid)[:, None]
        want = received_attention_reference(q.double(), k.double(), mask, d**-0.5, w.double()).float()
        got = received_attention_triton(q, k, pos, pos, valid, d**-0.5, w)
        assert torch.isfinite(got).all()
        err = (got - want).norm() / want.norm()
        assert err < tol, (dtype, shape, float(err))
