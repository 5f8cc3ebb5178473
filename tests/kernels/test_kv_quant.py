"""kv_quant: the Triton quantizers against the torch reference (CUDA only: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs CUDA", allow_module_level=True)
triton_kv = pytest.importorskip("mmeff.kernels.kv_quant.triton")

from mmeff.kernels.kv_quant import reference as kv_ref  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_and_dequantize_match_reference(dtype, bits, group):
    torch.manual_seed(bits * group)
    x = (torch.randn(4 * 32 * 64, 256, device="cuda") * torch.rand(256, device="cuda") * 4).to(dtype)
    p_ref, s_ref, o_ref = kv_ref.quantize_rows(x, bits, group)
    p_tri, s_tri, o_tri = triton_kv.quantize_rows(x, bits, group)
    torch.testing.assert_close(s_tri, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(o_tri, o_ref, rtol=0, atol=0)
    shifts = torch.arange(8 // bits, device="cuda") * bits
    codes_ref = (p_ref.int()[..., None] >> shifts) & ((1 << bits) - 1)
    codes_tri = (p_tri.int()[..., None] >> shifts) & ((1 << bits) - 1)
    differ = codes_ref != codes_tri  # only exact .5 ties may round differently (division rounding)
    assert differ.float().mean().item() < 1e-4 and ((codes_ref - codes_tri).abs() <= 1).all()
    d_ref = kv_ref.dequantize_rows(p_ref, s_ref, o_ref, bits, group, dtype)
    d_tri = triton_kv.dequantize_rows(p_ref, s_ref, o_ref, bits, group, dtype)
    assert rel_err(d_tri, d_ref) <= TOL[dtype]
    assert rel_err(triton_kv.dequantize_rows(p_tri, s_tri, o_tri, bits, group, dtype), d_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("gather", [False, True])
def test_fused_cache_quantization_matches_gather_then_reference(dtype, bits, axis, gather):
    """The cache-facing kernels read [B, H, T, D] in place (and gather the tokens themselves): same scales and
    offsets as gathering, transposing/padding and quantizing rows with the reference, codes off by at most a tie."""
    import mmeff.kernels.kv_quant as kvq

    torch.manual_seed(bits)
    x = (torch.randn(2, 4, 333, 128, device="cuda") * torch.rand(128, device="cuda") * 4).to(dtype)
    index = torch.stack([torch.randperm(333, device="cuda")[:301].sort().values for _ in range(2)]) if gather else None
    got = kvq.quantize_kv(x, bits, 32, axis, index)
    xx = kvq.gather_tokens(x, index)
    b, h, m, d = xx.shape
    if axis == "token":
        rows = xx.reshape(b * h * m, d)
    else:
        xt = xx.transpose(-1, -2)
        xt = torch.cat([xt, xt[..., -1:].expand(b, h, d, -m % 32)], -1)
        rows = xt.reshape(b * h * d, -1)
    p_ref, s_ref, o_ref = kv_ref.quantize_rows(rows, bits, 32)
    assert torch.equal(got.scale, s_ref) and torch.equal(got.offset, o_ref)
    shifts = torch.arange(8 // bits, device="cuda") * bits
    c_ref = (p_ref.int()[..., None] >> shifts) & ((1 << bits) - 1)
    c_got = (got.packed.int()[..., None] >> shifts) & ((1 << bits) - 1)
    assert (c_ref != c_got).float().mean().item() < 1e-4 and ((c_ref - c_got).abs() <= 1).all()
    want = kvq.QuantizedTensor((b, h, m, d), dtype, bits, 32, axis, p_ref, s_ref, o_ref).dequantize()
    assert got.dequantize().shape == (b, h, m, d) and rel_err(got.dequantize(), want) <= TOL[dtype]
    assert rel_err(got.dequantize(), xx) <= {2: 0.6, 4: 0.15, 8: 0.01}[bits]  # quantization error itself


@pytest.mark.parametrize("bits", [2, 4])
def test_timing_against_bandwidth_floor(bits):
    """Report-only timing: quantize+pack and dequantize of a 16k-token 7B layer vs the HBM bytes floor."""
    x = torch.randn(32 * 16384, 128, device="cuda", dtype=torch.float16)
    packed, scale, offset = triton_kv.quantize_rows(x, bits, 32)
    moved = x.numel() * 2 + packed.numel() + scale.numel() * 4
    for fn, args in ((triton_kv.quantize_rows, (x, bits, 32)),
                     (triton_kv.dequantize_rows, (packed, scale, offset, bits, 32, torch.float16))):
        fn(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        floor_ms = moved / 3.3e12 * 1e3  # H100 HBM3 ~3.3 TB/s
        print(f"{fn.__name__} {bits}-bit: {ms:.3f} ms, bytes floor {floor_ms:.3f} ms ({floor_ms / ms:.0%} of peak)")
        assert ms > 0
