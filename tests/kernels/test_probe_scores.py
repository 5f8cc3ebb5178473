"""probe_scores: the Triton kernel against the torch reference (CUDA only: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs CUDA", allow_module_level=True)
triton_probe = pytest.importorskip("mmeff.kernels.probe_scores.triton")

from mmeff.kernels.probe_scores import reference as probe_ref  # noqa: E402
from tests.kernels.test_kv_quant import TOL, rel_err  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 8, 1000, 64), (2, 32, 8, 4133, 128), (1, 32, 32, 16384, 128)])
def test_probe_scores_match_reference(dtype, shape):
    b, h, hkv, n, d = shape
    torch.manual_seed(n)
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
    p = max(1, n // 10)
    recent = torch.arange(n - p // 2, n, device="cuda")
    rand = torch.randperm(n - p // 2, device="cuda")[: p - p // 2]
    pos = torch.sort(torch.cat([rand, recent])).values.expand(b, -1).contiguous()
    w = torch.ones(b, pos.shape[1], device="cuda")
    ok = torch.ones(b, n, dtype=torch.bool, device="cuda")
    if b > 1:
        ok[1, :100] = False
        w[1, :3] = 0.0
    probe_q = torch.gather(q, 2, pos[:, None, :, None].expand(b, h, pos.shape[1], d))
    acc_ref, cnt_ref = probe_ref.probe_scores(probe_q, k, pos, w, ok, d**-0.5, chunk=64)
    acc_tri, cnt_tri = triton_probe.probe_scores(probe_q, k, pos, w, ok, d**-0.5)
    assert torch.equal(cnt_tri, cnt_ref)
    assert rel_err(acc_tri, acc_ref) <= TOL[dtype]
    # each probe row that sees at least one valid key sums to 1 (sample 1's early probes see none)
    sees = (torch.cumsum(ok.int(), 1).gather(1, pos) > 0).float()
    torch.testing.assert_close(acc_tri.sum(1), (w * sees).sum(1), rtol=TOL[dtype], atol=1e-3)
