"""kv_quant: ZipCache's quantizers against slow per-element references written here (CPU), and the Triton
quantizers against the torch reference (CUDA only: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from mmeff.kernels.kv_quant import reference as kv_ref
from tests.helpers import cuda_ms

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def triton_kv():
    if not torch.cuda.is_available():  # pragma: no cover - CPU machines
        pytest.skip("needs CUDA")
    return pytest.importorskip("mmeff.kernels.kv_quant.triton")


TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_and_dequantize_match_reference(triton_kv, dtype, bits, group):
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


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("gather", [False, True])
def test_fused_cache_quantization_matches_gather_then_reference(triton_kv, dtype, bits, axis, gather):
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


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 4])
def test_timing_against_bandwidth_floor(triton_kv, bits):
    """Report-only timing: quantize+pack and dequantize of a 16k-token 7B layer vs the HBM bytes floor."""
    x = torch.randn(32 * 16384, 128, device="cuda", dtype=torch.float16)
    packed, scale, offset = triton_kv.quantize_rows(x, bits, 32)
    moved = x.numel() * 2 + packed.numel() + scale.numel() * 4
    for fn, args in ((triton_kv.quantize_rows, (x, bits, 32)),
                     (triton_kv.dequantize_rows, (packed, scale, offset, bits, 32, torch.float16))):
        ms = cuda_ms(lambda fn=fn, args=args: fn(*args))
        floor_ms = moved / 3.3e12 * 1e3  # H100 HBM3 ~3.3 TB/s
        print(f"{fn.__name__} {bits}-bit: {ms:.3f} ms, bytes floor {floor_ms:.3f} ms ({floor_ms / ms:.0%} of peak)")
        assert ms > 0


# -- ZipCache's layouts against slow per-element references (CPU) -------------------------------------------------
def _code(x: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, bits: int) -> int:
    """One element's code, scalar float32 ops: floor((x - lo) / s + 0.5) clamped (0 when the range is empty)."""
    if s.item() == 0:
        return 0
    return int(min(max(torch.floor((x - lo) / s + 0.5).item(), 0), (1 << bits) - 1))


def _byte_code(packed: torch.Tensor, row: int, col: int, bits: int) -> int:
    """The code of column ``col`` of ``row``: byte col // per, at bit offset (col % per) * bits."""
    per = 8 // bits
    return (int(packed[row, col // per]) >> ((col % per) * bits)) & ((1 << bits) - 1)


def _params(lo: float, hi: float, bits: int, pdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    return lo32.to(pdt).float(), ((hi32 - lo32) / ((1 << bits) - 1)).to(pdt).float()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channel_separable_tokenwise_matches_per_element_reference(bits, dtype):
    """ZipCache's CST (arXiv 2405.14256 Sec. 4.1; released ``channel_separate_mixed_tokenwiseQ``), element by
    element: c[b,h,d] = sqrt(max_t |x|) over the block; y = x / c; per (b, token) one (lo, s) over every head's
    channels of y; code = floor((y - lo) / s + 0.5); x_hat = (code * s + lo) * c. Parameters rounded to fp16
    for half tensors, kept fp32 for fp32 ones; one zero channel gets c = 1."""
    import mmeff.kernels.kv_quant as kvq

    torch.manual_seed(bits)
    b, h, t, d = 2, 3, 9, 8
    x = (torch.randn(b, h, t, d) * torch.linspace(0.05, 6, d)).to(dtype)
    x[1, 2, :, 5] = 0.0  # an all-zero channel
    index = torch.tensor([[0, 2, 3, 7, 8], [1, 4, 5, 6, 6]])  # the part's tokens (padding repeats a member)
    pdt = torch.float32 if dtype == torch.float32 else torch.float16
    c = torch.empty(b, h, d)
    for bi in range(b):
        for hi in range(h):
            for di in range(d):
                m = max(abs(float(x[bi, hi, ti, di])) for ti in range(t))  # the whole block, before the split
                c[bi, hi, di] = torch.tensor(m).sqrt().to(pdt).float().item() if m > 0 else 1.0
    qt = kvq.quantize_tokens_cst(x, bits, kv_ref.channel_scale(x), index)
    assert qt.scheme == "cst" and qt.scale.shape == (b, 5) and qt.cscale.shape == (b, h, d)
    assert torch.equal(qt.cscale.float(), c)
    want = torch.empty(b, h, 5, d)
    for bi in range(b):
        for mi, ti in enumerate(index[bi].tolist()):
            y = [[x[bi, hi, ti, di].float() / c[bi, hi, di] for di in range(d)] for hi in range(h)]
            flat = [v.item() for row in y for v in row]
            lo, s = _params(min(flat), max(flat), bits, pdt)
            assert qt.offset[bi, mi].float().item() == lo.item() and qt.scale[bi, mi].float().item() == s.item()
            for hi in range(h):
                for di in range(d):
                    code = _code(y[hi][di], lo, s, bits)
                    assert _byte_code(qt.packed, (bi * h + hi) * 5 + mi, di, bits) == code
                    want[bi, hi, mi, di] = (code * s + lo) * c[bi, hi, di]
    torch.testing.assert_close(qt.dequantize().float(), want.to(dtype).float(), rtol=1e-3 if pdt != torch.float32
                               else 1e-6, atol=1e-6)
    # the block's normalisers make the error of each token at most half its step, times c
    step = qt.scale.float()[:, None, :, None] * c[:, :, None, :]
    err = (qt.dequantize().float() - kvq.gather_tokens(x, index).float()).abs()
    assert bool((err <= step / 2 * (1 + 1e-3) + 1e-3 * (dtype != torch.float32)).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_whole_part_channel_keys_match_per_element_reference(bits):
    """ZipCache's keys (released ``mixed_channelwiseQ``), element by element: one (lo, s) per (b, h, channel)
    over all the part's tokens; rows (b, h, channel) padded to the 16-token tile with the last token's code."""
    import mmeff.kernels.kv_quant as kvq

    torch.manual_seed(bits + 10)
    b, h, t, d, block = 2, 2, 30, 4, 16
    x = torch.randn(b, h, t, d) * torch.tensor([0.1, 1.0, 8.0, 0.5])
    index = torch.stack([torch.randperm(t)[:21].sort().values for _ in range(b)])
    qt = kvq.quantize_channels_whole(x, bits, block, index)
    assert qt.scheme == "row" and qt.scale.shape == (b * h * d, 1) and qt.packed.shape == (b * h * d, 32 * bits // 8)
    want = torch.empty(b, h, 21, d)
    for bi in range(b):
        for hi in range(h):
            for di in range(d):
                row = (bi * h + hi) * d + di
                vals = [x[bi, hi, ti, di] for ti in index[bi].tolist()]
                lo, s = _params(min(v.item() for v in vals), max(v.item() for v in vals), bits, torch.float32)
                assert qt.offset[row, 0].item() == lo.item() and qt.scale[row, 0].item() == s.item()
                for mi, v in enumerate(vals):
                    code = _code(v, lo, s, bits)
                    assert _byte_code(qt.packed, row, mi, bits) == code
                    want[bi, hi, mi, di] = code * s + lo
                for mi in range(21, 32):  # the tile padding repeats the last token
                    assert _byte_code(qt.packed, row, mi, bits) == _byte_code(qt.packed, row, 20, bits)
    torch.testing.assert_close(qt.dequantize(), want, rtol=1e-6, atol=1e-6)


def test_quantizer_bytes_per_element():
    """What each quantizer stores per part, exactly: codes + its parameters (fp16 for a half tensor)."""
    import mmeff.kernels.kv_quant as kvq

    b, h, m, d = 1, 4, 256, 128
    k, v = torch.randn(b, h, m, d).half(), torch.randn(b, h, m, d).half()
    codes = b * h * m * d * 4 // 8  # 4-bit codes of keys or values
    got = {}
    for q in kvq.QUANTIZERS:
        kq, vq = kvq.quantize_key_value(k, v, 4, 32, q, None, kvq.block_scales(k, v, q))
        got[q] = (kq.nbytes(), vq.nbytes())
    assert got["kivi"] == (codes + 2 * 2 * b * h * d * (m // 32), codes + 2 * 2 * b * h * m * (d // 32))
    cst = codes + 2 * 2 * b * m + 2 * b * h * d  # per-token (scale, offset) over all heads + the normalisers
    assert got["zipcache"] == (codes + 2 * 2 * b * h * d, cst)
    assert got["cst"] == (cst, cst)
    # extra bits per element: KIVI's fp16 group-32 (scale, offset) 32 / 32 = 1; ZipCache's keys 32 / M, values
    # 32 / (H * D) + 16 / M (M tokens in the part)
    elements = b * h * m * d
    assert (got["kivi"][0] - codes) * 8 / elements == 1.0 == (got["kivi"][1] - codes) * 8 / elements
    assert (got["zipcache"][0] - codes) * 8 / elements == 32 / m
    assert (got["zipcache"][1] - codes) * 8 / elements == 32 / (h * d) + 16 / m


def test_quantize_key_value_refuses_bad_input():
    import mmeff.kernels.kv_quant as kvq

    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="quantizer"):
        kvq.quantize_key_value(x, x, 4, 16, "gptq", None, (x[..., 0, :], x[..., 0, :]))
    with pytest.raises(ValueError, match="channel scales"):
        kvq.quantize_key_value(x, x, 4, 16, "zipcache")
    with pytest.raises(ValueError, match="whole bytes"):
        kvq.quantize_tokens_cst(torch.randn(1, 1, 4, 6), 2, torch.ones(1, 1, 6))


# -- ZipCache's layouts: the Triton kernels against the torch reference -----------------------------------------
def compare_zipcache_kernels(device: str) -> list[tuple[str, float]]:
    """For both ZipCache kernels (values: channel-separable token-wise; keys: per channel over the whole part),
    every dtype / width, with and without a token gather, on ``device``: raises unless the parameters equal the
    reference's; returns (case, share of codes that differ) — only division ties may."""
    from mmeff.kernels.kv_quant import gather_tokens
    from mmeff.kernels.kv_quant import triton as kernel

    out = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bits in (2, 4, 8):
            for gather in (False, True):
                b, h, t, d = 2, 3, 70, 32
                x = (torch.randn(b, h, t, d, generator=gen) * torch.rand(d, generator=gen) * 4).to(dtype)
                idx = torch.stack([torch.randperm(t, generator=gen)[:45].sort().values for _ in range(b)])
                x, idx = x.to(device), idx.to(device) if gather else None
                xs = gather_tokens(x, idx)
                c = kv_ref.channel_scale(x)
                got = kernel.quantize_cst(x, bits, c, idx)
                want = kv_ref.quantize_cst(xs, bits, c)
                m, pad = xs.shape[2], -xs.shape[2] % 32
                rows = torch.cat([xs.transpose(-1, -2), xs.transpose(-1, -2)[..., -1:].expand(b, h, d, pad)], -1)
                got_k = kernel.quantize_channels_whole(x, bits, 32, idx)
                want_k = kv_ref.quantize_groups(rows.reshape(b * h * d, m + pad), bits, m + pad,
                                                kv_ref.param_dtype(dtype))
                for name, g, w in (("values", got, want), ("keys", got_k, want_k)):
                    case = f"{name} {dtype} {bits}-bit gather={gather}"
                    assert torch.equal(g[1], w[1]) and torch.equal(g[2], w[2]), case
                    differ = kv_ref.unpack(g[0], bits) != kv_ref.unpack(w[0], bits)
                    out.append((case, differ.float().mean().item()))
    return out


def test_zipcache_kernels_in_the_triton_interpreter():
    """The kernels' logic on CPU: Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined,
    hence a fresh process) runs them on CPU tensors; parameters and codes must equal the reference's."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = ("from tests.kernels.test_kv_quant import compare_zipcache_kernels as f; "
            "r = f('cpu'); print(len(r), max(s for _, s in r))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    n, worst = done.stdout.split()
    assert int(n) == 36 and float(worst) == 0.0  # the interpreter divides exactly, as the reference


@gpu
@needs_cuda
def test_zipcache_kernels_match_reference_on_cuda():
    pytest.importorskip("mmeff.kernels.kv_quant.triton")
    for case, share in compare_zipcache_kernels("cuda"):
        assert share < 1e-3, case  # only .5 ties may round differently (the kernel's division)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 4])
def test_zipcache_kernel_timing(bits):
    """Report-only: ZipCache's quantizers on a 16k-token 7B layer, Triton against the torch reference."""
    from mmeff.kernels.kv_quant import triton as kernel

    x = torch.randn(1, 32, 16384, 128, device="cuda", dtype=torch.float16)
    c = kv_ref.channel_scale(x)
    rows = x.transpose(-1, -2).reshape(32 * 128, 16384)
    cases = {
        "values cst triton": lambda: kernel.quantize_cst(x, bits, c, None),
        "values cst torch": lambda: kv_ref.quantize_cst(x, bits, c),
        "keys whole triton": lambda: kernel.quantize_channels_whole(x, bits, 32, None),
        "keys whole torch": lambda: kv_ref.quantize_groups(rows, bits, 16384, torch.float16),
    }
    for name, fn in cases.items():
        print(f"{name} {bits}-bit: {cuda_ms(fn, 10):.3f} ms")
