"""ZipVL's Triton kernels against their torch references (CUDA only: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs CUDA", allow_module_level=True)
triton_kv = pytest.importorskip("mmeff.kernels.kv_quant.triton")
triton_probe = pytest.importorskip("mmeff.kernels.probe_scores.triton")

from mmeff.kernels.kv_quant import reference as kv_ref  # noqa: E402
from mmeff.kernels.probe_scores import reference as probe_ref  # noqa: E402

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


def _quantized_part(b, hkv, t, m, d, bits, dtype, pad=3):
    """A ZipVL part: ``m`` of ``t`` block tokens quantized (the last ``pad`` entries of sample 0: padding)."""
    import mmeff.kernels.kv_quant as kvq

    k = (torch.randn(b, hkv, t, d, device="cuda") * torch.rand(d, device="cuda") * 3).to(dtype)
    v = torch.randn(b, hkv, t, d, device="cuda").to(dtype)
    index = torch.stack([torch.randperm(t, device="cuda")[:m].sort().values for _ in range(b)])
    index[0, m - pad:] = t
    at = torch.where(index < t, index, 0)
    keys, values = kvq.quantize_kv(k, bits, 32, "channel", at), kvq.quantize_kv(v, bits, 32, "token", at)
    return keys, values, index.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("shape", [(1, 32, 32, 5000, 4100, 128), (3, 28, 4, 777, 600, 128), (2, 8, 8, 70, 33, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantized_decode_attention_matches_reference(dtype, bits, shape, with_bias):
    """Fused split-K dequant-attention over two packed parts plus the merge kernel with a full-precision
    buffer = dequantize, then attend (GQA, padding tokens, hidden columns, >64 partials)."""
    from mmeff.kernels.quant_attention import Segment
    from mmeff.kernels.quant_attention import reference as qa_ref
    from mmeff.kernels.quant_attention import triton as qa_tri

    b, hq, hkv, t, m, d = shape
    torch.manual_seed(t + bits[0])
    bias = None
    if with_bias:
        bias = torch.zeros(b, t + 37, device="cuda")
        bias[:, : t // 5] = float("-inf")  # left padding
    parts = []
    for i, nbits in enumerate(bits):
        keys, values, index = _quantized_part(b, hkv, t, m // (i + 1), d, nbits, dtype)
        parts.append(Segment(keys, values, index, t, None if bias is None else bias[:, :t]))
    q = torch.randn(b, hq, d, device="cuda").to(dtype)
    k_buf = torch.randn(b, hkv, 37, d, device="cuda").to(dtype)
    v_buf = torch.randn_like(k_buf)
    buf_bias = None if bias is None else bias[:, t:]
    o_ref, p_ref = qa_ref.decode_attention(q, parts, k_buf, v_buf, buf_bias, d**-0.5)
    o_tri, p_tri = qa_tri.decode_attention(q, parts, k_buf, v_buf, buf_bias, d**-0.5)
    assert o_tri.dtype == dtype and rel_err(o_tri, o_ref) <= TOL[dtype]
    assert rel_err(p_tri, p_ref) <= TOL[dtype]
    for part in parts:  # and each part's partials alone
        (o1, l1), (o2, l2) = (impl.part_attention(q, part, d**-0.5) for impl in (qa_ref, qa_tri))
        w1, w2 = torch.softmax(l1, -1), torch.softmax(l2, -1)
        assert rel_err((w2[..., None] * o2).sum(2), (w1[..., None] * o1).sum(2)) <= TOL[dtype]
        torch.testing.assert_close(torch.logsumexp(l2, -1), torch.logsumexp(l1, -1), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("tokens", [16384, 65536])
def test_quantized_decode_attention_timing(tokens):
    """Report-only: one decode step's attention over a 7B layer (32 heads x 128) holding ``tokens`` tokens —
    fp16 SDPA over the full-precision cache, the materialised path (dequantize the parts, then SDPA) and the
    fused kernels over a 4-bit half + 2-bit half (+ a 64-token buffer) — against the HBM bytes floor."""
    import torch.nn.functional as F

    from mmeff.kernels.quant_attention import Segment, decode_attention

    dtype, d, h = torch.float16, 128, 32
    half = tokens // 2
    parts = [Segment(*_quantized_part(1, h, tokens, half, d, bits, dtype, pad=0), tokens, None) for bits in (4, 2)]
    q = torch.randn(1, h, d, device="cuda", dtype=dtype)
    k = torch.randn(1, h, tokens, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    k_buf, v_buf = k[:, :, :64].contiguous(), v[:, :, :64].contiguous()

    def sdpa():
        F.scaled_dot_product_attention(q[:, :, None], k, v)

    def materialised():
        kk = torch.cat([p.keys.dequantize() for p in parts], 2)
        vv = torch.cat([p.values.dequantize() for p in parts], 2)
        F.scaled_dot_product_attention(q[:, :, None], kk, vv)

    def fused():
        decode_attention(q, parts, k_buf, v_buf, None, d**-0.5)

    def timed(fn):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    bw = 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12
    fp_bytes = 2 * k.numel() * 2
    q_bytes = sum(p.keys.nbytes() + p.values.nbytes() + p.index.numel() * 4 for p in parts)
    rows = {"sdpa fp16": (sdpa, fp_bytes), "dequantize+sdpa": (materialised, q_bytes + 2 * fp_bytes),
            "fused 4/2-bit": (fused, q_bytes)}
    for name, (fn, nbytes) in rows.items():
        ms = timed(fn)
        floor = nbytes / bw * 1e3
        print(f"decode attention {tokens} tokens, {name}: {ms:.3f} ms, bytes floor {floor:.3f} ms "
              f"({floor / ms:.0%} of peak)")
        assert ms > 0


@torch.no_grad()
def test_generate_with_fused_decode_equals_materialised_reference(tiny_model_dir):
    """End to end on CUDA: ``generate`` decoding through the Triton kernel = the dequantize-then-SDPA path
    (left-padded batch, recompression every 2 tokens)."""
    from mmeff_lab.models.factory import load_tiny
    from tests.test_wrap import batch
    from tests.test_zipvl import assert_fused_decode_matches_reference

    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    model.to("cuda")
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch(processor, "llava").items()}
    assert_fused_decode_matches_reference(model, inputs)
