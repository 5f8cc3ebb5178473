"""The Triton kernels of VFlowOpt's importance map against the torch reference (GPU only)."""

from __future__ import annotations

import pytest
import torch

from mmeff.kernels.vflowopt_score import reference as ref

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


@cuda
@pytest.mark.parametrize("p", [16, 196, 784, 3000])
def test_patch_entropy_kernel(p):
    pytest.importorskip("triton")
    from mmeff.kernels.vflowopt_score import triton as kernel

    g = torch.Generator().manual_seed(p)
    levels = torch.randint(0, 256, (257, p), generator=g)
    levels[0] = 7  # a flat patch: entropy 0
    levels[1, : p // 2] = 3  # some skew
    want = ref.patch_entropy(levels)
    got = kernel.patch_entropy(levels.cuda()).cpu()
    assert got[0].item() == pytest.approx(0.0, abs=1e-6)
    assert _rel(got, want) <= 1e-5


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("layout", ["clip", "qwen_windows"])
@pytest.mark.parametrize("t", [0.0, 1.0, 5.0])
def test_context_relevance_kernel(dtype, tol, layout, t):
    pytest.importorskip("triton")
    from mmeff.kernels.vflowopt_score import triton as kernel

    g = torch.Generator().manual_seed(0)
    if layout == "clip":  # 3 tiles of CLS + 24x24 patches, each its own block and unit; head_dim 64
        blocks, units, h, d = [577] * 3, [577] * 3, 16, 64
    else:  # 2 images split into windows of 64 (last ones ragged); head_dim 80 (Qwen2-VL)
        blocks, units, h, d = [64] * 5 + [37] + [64] * 3 + [11], [357, 203], 16, 80
    s = sum(blocks)
    q = torch.randn(h, s, d, generator=g).to(dtype)
    k = torch.randn(h, s, d, generator=g).to(dtype)
    block = torch.cat([torch.full((n,), i) for i, n in enumerate(blocks)])
    unit = torch.cat([torch.full((n,), i) for i, n in enumerate(units)])
    want = ref.context_relevance(q.float(), k.float(), d**-0.5, block, unit, t)
    got = kernel.context_relevance(q.cuda(), k.cuda(), d**-0.5, block.cuda(), unit.cuda(), t).cpu()
    assert _rel(got, want) <= tol


@cuda
def test_dispatch_uses_kernel_on_cuda():
    pytest.importorskip("triton")
    from mmeff.kernels import vflowopt_score

    levels = torch.randint(0, 256, (4, 64))
    torch.testing.assert_close(vflowopt_score.patch_entropy(levels.cuda()).cpu(), ref.patch_entropy(levels),
                               rtol=1e-5, atol=1e-5)
