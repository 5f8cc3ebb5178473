"""vflowopt_score: the torch reference pinned on known inputs (CPU), and the Triton kernels of VFlowOpt's importance
map against it (GPU only)."""

from __future__ import annotations

import pytest
import torch

from mmeff.kernels.vflowopt_score import reference as ref
from tests.helpers import dense_relevance


def cuda(fn):
    """A GPU test: marked ``gpu`` and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


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
@pytest.mark.parametrize("t,t_max", [(0.0, None), (1.0, None), (5.0, None), (50.0, None), (50.0, 0.5)])
def test_context_relevance_kernel(dtype, tol, layout, t, t_max):
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
    want = ref.context_relevance(q.float(), k.float(), d**-0.5, block, unit, t, t_max=t_max, details=True)
    got = kernel.context_relevance(q.cuda(), k.cuda(), d**-0.5, block.cuda(), unit.cuda(), t, t_max=t_max,
                                   details=True)
    assert _rel(got.scores.cpu(), want.scores) <= tol
    assert torch.equal(got.empty.cpu(), want.empty) and torch.equal(got.n_global.cpu(), want.n_global)


@cuda
def test_dispatch_uses_kernel_on_cuda():
    pytest.importorskip("triton")
    from mmeff.kernels import vflowopt_score

    levels = torch.randint(0, 256, (4, 64))
    torch.testing.assert_close(vflowopt_score.patch_entropy(levels.cuda()).cpu(), ref.patch_entropy(levels),
                               rtol=1e-5, atol=1e-5)


def test_entropy_of_known_patches():
    flat = torch.full((1, 64), 17)
    halves = torch.cat([torch.zeros(1, 32), torch.full((1, 32), 200)], 1)
    quarters = torch.arange(4).repeat_interleave(16)[None] * 60
    every = torch.arange(256)[None]
    got = ref.patch_entropy(torch.cat([flat, halves.long(), quarters, every[:, :64] * 0 + every[:, 64:128]]))
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 2.0, 6.0]), atol=1e-5, rtol=0)
    assert ref.patch_entropy(every).item() == pytest.approx(8.0, abs=1e-5)


def test_grey_levels_follow_official_rounding():
    # channels truncated after * 255, weighted 0.3333 each, rounded: (1.0, 1.0, 1.0) -> 254.97 -> 255
    px = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.25, 0.0], [-0.2, 2.0, 0.0]])[..., None]
    assert ref.grey_levels(px).flatten().tolist() == [255, round(0.3333 * (127 + 63)), round(0.3333 * 255)]


def test_global_token_selection_and_context_relevance():
    # hand-made attention: token 2 receives most; with t = 1.5 it is the only global token
    a = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.2, 0.1, 0.6, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.6, 0.1]])
    recv = a.mean(0)
    unit = torch.zeros(4, dtype=torch.long)
    assert ref.global_rows(recv, unit, 1.5).tolist() == [False, False, True, False]
    assert ref.global_rows(recv, unit, 0.0).all()
    assert ref.global_rows(recv, unit, 100.0).tolist() == [False, False, True, False]  # none pass: the argmax
    # two units, ties: each falls back to its earliest most-attended token; n_units given or inferred
    recv2, unit2 = torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0, 2.0]), torch.tensor([0, 0, 0, 0, 1, 1])
    want = [False, True, False, False, True, False]
    assert ref.global_rows(recv2, unit2, 100.0).tolist() == want
    assert ref.global_rows(recv2, unit2, 100.0, n_units=2).tolist() == want
    # bounded rule (ours): threshold min(t * mean, t_max * max); the empty flag follows the released t * mean
    recv3, unit3 = torch.tensor([1.0, 4.0, 3.0, 0.5, 2.0, 1.0]), torch.tensor([0, 0, 0, 0, 1, 1])
    glob, empty = ref.global_selection(recv3, unit3, 100.0, t_max=0.6)  # caps 2.4 and 1.2
    assert glob.tolist() == [False, True, True, False, True, False] and empty.tolist() == [True, True]
    glob, empty = ref.global_selection(recv3, unit3, 1.5, t_max=0.9)  # min(3.19, 3.6) and min(2.25, 1.8)
    assert glob.tolist() == [False, True, False, False, True, False] and empty.tolist() == [False, True]
    # packed sequences with blocks and units equal the dense per-unit formula
    torch.manual_seed(0)
    h, d = 3, 8
    sizes, blocks = [5, 7, 4], [[5], [3, 4], [4]]
    q, k = torch.randn(h, 16, d), torch.randn(h, 16, d)
    block = torch.cat([torch.full((n,), i) for i, n in enumerate(x for b in blocks for x in b)])
    unit = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    for t in (0.0, 1.0, 2.5):
        got = ref.context_relevance(q, k, 0.3, block, unit, t)
        start = 0
        for u, n in enumerate(sizes):
            sl = slice(start, start + n)
            a = torch.zeros(n, n)
            off = 0
            for bl in blocks[u]:
                s = torch.einsum("hqd,hkd->hqk", q[:, sl][:, off : off + bl], k[:, sl][:, off : off + bl]) * 0.3
                a[off : off + bl, off : off + bl] = s.softmax(-1).mean(0)
                off += bl
            torch.testing.assert_close(got[sl], dense_relevance(a, t), rtol=1e-5, atol=1e-6)
            start += n
