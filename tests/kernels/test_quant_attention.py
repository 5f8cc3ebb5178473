"""quant_attention: fused decode attention over quantized parts against the torch reference (CUDA only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs CUDA", allow_module_level=True)
triton_kv = pytest.importorskip("mmeff.kernels.kv_quant.triton")

from tests.helpers import cuda_ms  # noqa: E402
from tests.kernels.test_kv_quant import TOL, rel_err  # noqa: E402


def _quantized_part(b, hkv, t, m, d, bits, dtype, pad=3, quantizer="kivi"):
    """A ZipVL part: ``m`` of ``t`` block tokens quantized (the last ``pad`` entries of sample 0: padding)."""
    import mmeff.kernels.kv_quant as kvq

    k = (torch.randn(b, hkv, t, d, device="cuda") * torch.rand(d, device="cuda") * 3).to(dtype)
    v = (torch.randn(b, hkv, t, d, device="cuda") * torch.rand(d, device="cuda") * 2).to(dtype)
    index = torch.stack([torch.randperm(t, device="cuda")[:m].sort().values for _ in range(b)])
    index[0, m - pad:] = t
    at = torch.where(index < t, index, 0)
    keys, values = kvq.quantize_key_value(k, v, bits, 32, quantizer, at, kvq.block_scales(k, v, quantizer))
    return keys, values, index.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("shape", [(1, 32, 32, 5000, 4100, 128), (3, 28, 4, 777, 600, 128), (2, 8, 8, 70, 33, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("quantizer", ["kivi", "zipcache"])
def test_quantized_decode_attention_matches_reference(dtype, bits, shape, with_bias, quantizer):
    """Fused split-K dequant-attention over two packed parts plus the merge kernel with a full-precision
    buffer = dequantize, then attend (GQA, padding tokens, hidden columns, >64 partials); KIVI's groups and
    ZipCache's layout (whole-part key rows, channel-separable values with their normalisers)."""
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
        keys, values, index = _quantized_part(b, hkv, t, m // (i + 1), d, nbits, dtype, quantizer=quantizer)
        assert qa_tri.supports(keys, values)
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
@pytest.mark.parametrize("quantizer", ["kivi", "zipcache"])
def test_quantized_decode_attention_timing(tokens, quantizer):
    """Report-only: one decode step's attention over a 7B layer (32 heads x 128) holding ``tokens`` tokens —
    fp16 SDPA over the full-precision cache, the materialised path (dequantize the parts, then SDPA) and the
    fused kernels over a 4-bit half + 2-bit half (+ a 64-token buffer) — against the HBM bytes floor."""
    import torch.nn.functional as F

    from mmeff.kernels.quant_attention import Segment, decode_attention

    dtype, d, h = torch.float16, 128, 32
    half = tokens // 2
    parts = [Segment(*_quantized_part(1, h, tokens, half, d, bits, dtype, pad=0, quantizer=quantizer), tokens, None)
             for bits in (4, 2)]
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

    bw = 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12
    fp_bytes = 2 * k.numel() * 2
    q_bytes = sum(p.keys.nbytes() + p.values.nbytes() + p.index.numel() * 4 for p in parts)  # what the kernel reads
    rows = {"sdpa fp16": (sdpa, fp_bytes), "dequantize+sdpa": (materialised, q_bytes + 2 * fp_bytes),
            "fused 4/2-bit": (fused, q_bytes)}
    for name, (fn, nbytes) in rows.items():
        ms = cuda_ms(fn)
        floor = nbytes / bw * 1e3
        print(f"decode attention {tokens} tokens ({quantizer}), {name}: {ms:.3f} ms, bytes floor {floor:.3f} ms "
              f"({floor / ms:.0%} of peak)")
        assert ms > 0
