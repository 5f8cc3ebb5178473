"""Fused split-K decode attention over a quantized ZipVL part (same formulas as :mod:`.reference`).

One program per (sample, query head, split of the part's tokens) walks its tokens one key group at a time:
it loads the packed key bytes of the block ([D, group], one byte serving ``8 / bits`` tokens) and the packed
value bytes, unpacks the codes in registers, folds the group scales and offsets into the query and the
softmax weights (so no dequantized tile is formed), and runs the online softmax. Only the codes, scales and
offsets are read — a quarter (4-bit) or an eighth (2-bit) of the fp16 bytes — and nothing is written but
the (out, lse) partials, which a small merge kernel combines with the full-precision buffer
(:func:`decode_attention`: one launch per part plus one, whatever the layer holds). Splits keep every SM
busy at batch 1."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmeff.kernels.kv_quant import QuantizedTensor
from mmeff.kernels.quant_attention.reference import Segment

PROGRAMS_PER_SM = 64  # split-K: enough programs in flight to hide the load latency at batch 1 (tile sweep:
NUM_WARPS = 2  # benchmarks/quant_decode_kernel.py on the H200)


@triton.jit
def _part_decode_kernel(
    q_ptr, kp_ptr, ks_ptr, ko_ptr, vp_ptr, vs_ptr, vo_ptr, cs_ptr, idx_ptr, bias_ptr, out_ptr, lse_ptr,
    M, MP, HQ, GQ, length, bias_stride, blocks_per_split, s_total, s_offset, scaling,
    ks_row, ks_blk, vs_b, vs_h, vs_t, vs_g,
    D: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, QMAX: tl.constexpr, GK: tl.constexpr,
    GV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CS: tl.constexpr,
):
    """A block is GK tokens, within which each key channel has one scale and offset (its KIVI group, or the
    whole part for ZipCache's per-channel keys: ``ks_blk = 0``): ``q . k_t = sum_d (q_d s_d) code_dt +
    sum_d q_d o_d``; values keep their channel groups as a tile axis: ``sum_t p_t v_t = sum_t (p_t s_tg)
    code_tgj + sum_t p_t o_tg``, so scales never expand to element tiles. Value parameters are addressed by
    strides (b, kv head, token, group): ZipCache's channel-separable values have one per (b, token) over all
    heads (``vs_h = vs_g = 0``, GV = D) and a channel normaliser ``c[b, h, d]`` (HAS_CS) applied to the
    finished output: ``sum_t p_t c_d x_td = c_d sum_t p_t x_td``. Packed bytes are loaded as contiguous byte
    tiles (vectorised) and unpacked along a trailing PER axis."""
    NG: tl.constexpr = D // GV
    NBK: tl.constexpr = GK // PER  # key bytes per channel and block
    GVB: tl.constexpr = GV // PER  # value bytes per channel group
    pid = tl.program_id(0)  # b * HQ + query head
    split = tl.program_id(1)
    b = (pid // HQ).to(tl.int64)
    hk = ((pid % HQ) // GQ).to(tl.int64)
    bh_kv = b * (HQ // GQ) + hk  # (b, kv head): GQA shares it between GQ query heads
    d = tl.arange(0, D)
    q = tl.load(q_ptr + pid.to(tl.int64) * D + d).to(tl.float32) * scaling
    krow = bh_kv * D + d  # key rows are (b, kv head, channel); their bytes run along tokens
    k_bytes = MP // PER
    k_groups = MP // GK
    sub = tl.arange(0, PER)
    jb = tl.arange(0, NBK)
    g = tl.arange(0, NG)
    jv = tl.arange(0, GVB)
    v_col = g[:, None] * GVB + jv[None, :]  # [NG, GVB] byte of each value (group, byte) entry
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([NG, GVB, PER], tl.float32)
    for i in range(0, blocks_per_split):
        blk = split * blocks_per_split + i
        in_part = blk < k_groups
        t2 = blk * GK + jb[:, None] * PER + sub[None, :]  # [NBK, PER] token of each (byte, slot)
        ok2 = t2 < M
        idx = tl.load(idx_ptr + b * M + t2, mask=ok2, other=length)
        live = ok2 & (idx < length)  # padding tokens of the part sit in the block's dummy column
        kb = tl.load(kp_ptr + krow[:, None] * k_bytes + blk * NBK + jb[None, :], mask=in_part, other=0)
        code = ((kb.to(tl.int32)[:, :, None] >> (sub[None, None, :] * BITS)) & QMAX).to(tl.float32)  # [D, NBK, PER]
        ks = tl.load(ks_ptr + krow * ks_row + blk * ks_blk, mask=in_part, other=0.0).to(tl.float32)
        ko = tl.load(ko_ptr + krow * ks_row + blk * ks_blk, mask=in_part, other=0.0).to(tl.float32)
        s = tl.sum((q * ks)[:, None, None] * code, axis=0) + tl.sum(q * ko, axis=0)  # [NBK, PER]
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * bias_stride + idx, mask=live, other=0.0)
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(tl.max(s, axis=1), axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no visible token adds nothing
        alpha = tl.exp(m_i - m_safe)
        p2 = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(tl.sum(p2, axis=1), axis=0)
        p = tl.reshape(p2, [GK])  # token order: byte-major, as t2
        t = blk * GK + tl.arange(0, GK)
        ok = t < M
        vrow = bh_kv * M + t  # value rows are (b, kv head, token); their bytes run along channels
        vg = b * vs_b + hk * vs_h + t[:, None] * vs_t + g[None, :] * vs_g  # [GK, NG]
        vs = tl.load(vs_ptr + vg, mask=ok[:, None], other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + vg, mask=ok[:, None], other=0.0).to(tl.float32)
        vb = tl.load(vp_ptr + vrow[:, None, None] * (D // PER) + v_col[None, :, :], mask=ok[:, None, None], other=0)
        vcode = ((vb.to(tl.int32)[:, :, :, None] >> (sub[None, None, None, :] * BITS)) & QMAX).to(tl.float32)
        ps = p[:, None] * vs  # [GK, NG]
        acc = (acc * alpha + tl.sum(ps[:, :, None, None] * vcode, axis=0)
               + tl.sum(p[:, None] * vo, axis=0)[:, None, None])
        m_i = m_new
    o = pid.to(tl.int64) * s_total + s_offset + split
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    chan = v_col[:, :, None] * PER + sub[None, None, :]  # [NG, GVB, PER]
    if HAS_CS:
        acc = acc * tl.load(cs_ptr + bh_kv * D + chan).to(tl.float32)
    tl.store(out_ptr + o * D + chan, tl.where(has, acc / l_safe, 0.0))
    tl.store(lse_ptr + o, tl.where(has, m_i + tl.log(l_safe), float("-inf")))


@triton.jit
def _merge_kernel(
    q_ptr, out_ptr, lse_ptr, kb_ptr, vb_ptr, bias_ptr, res_ptr, probs_ptr,
    S, NB, HQ, GQ, bias_stride, kb_sb, kb_sh, kb_st, vb_sb, vb_sh, vb_st, scaling,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One program per (sample, query head): the log-sum-exp over the S partials and the NB buffer tokens
    (each a partial whose lse is its score), then the weighted sum; writes the output and the buffer's
    probabilities (ZipVL's recompression scores)."""
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    hk = ((pid % HQ) // GQ).to(tl.int64)
    row = pid.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + row * D + d).to(tl.float32) * scaling
    kb = kb_ptr + b * kb_sb + hk * kb_sh
    vb = vb_ptr + b * vb_sb + hk * vb_sh
    bias = bias_ptr + b * bias_stride
    m = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.zeros([], tl.float32)
    for s0 in range(0, S, BLOCK_S):  # pass 1: the running max and sum
        i = s0 + tl.arange(0, BLOCK_S)
        m, l_sum = _online(m, l_sum, tl.load(lse_ptr + row * S + i, mask=i < S, other=float("-inf")))
    for t0 in range(0, NB, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m, l_sum = _online(m, l_sum, _buffer_scores(q, kb, kb_st, bias, t, NB, d, HAS_BIAS))
    total = m + tl.log(l_sum)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, S, BLOCK_S):  # pass 2: the weighted sum
        i = s0 + tl.arange(0, BLOCK_S)
        w = tl.exp(tl.load(lse_ptr + row * S + i, mask=i < S, other=float("-inf")) - total)
        o = tl.load(out_ptr + (row * S + i)[:, None] * D + d[None, :], mask=(i < S)[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
    for t0 in range(0, NB, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < NB
        p = tl.where(ok, tl.exp(_buffer_scores(q, kb, kb_st, bias, t, NB, d, HAS_BIAS) - total), 0.0)
        v = tl.load(vb + t[:, None] * vb_st + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(p[:, None] * v, axis=0)
        tl.store(probs_ptr + row * NB + t, p, mask=ok)
    tl.store(res_ptr + row * D + d, acc.to(res_ptr.dtype.element_ty))


@triton.jit
def _online(m, l_sum, x):
    """One step of the running (max, sum of exp) over the scores ``x`` (-inf entries count for nothing)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_sum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)


@triton.jit
def _buffer_scores(q, kb, kb_st, bias, t, NB, d, HAS_BIAS: tl.constexpr):
    """Scores of the buffered tokens ``t`` (scaled query · key, + bias); -inf past the buffer's end."""
    ok = t < NB
    k = tl.load(kb + t[:, None] * kb_st + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x = tl.sum(q[None, :] * k, axis=1)
    if HAS_BIAS:
        x += tl.load(bias + t, mask=ok, other=0.0)
    return tl.where(ok, x, float("-inf"))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(keys: QuantizedTensor, values: QuantizedTensor) -> bool:
    """Keys per channel (KIVI groups or ZipCache's whole-part rows) and values per token (KIVI groups or
    ZipCache's channel-separable layout); CST keys (``quantizer="cst"``) go to the torch reference."""
    d = keys.shape[-1]
    return (keys.axis == "channel" and keys.scheme in ("group", "row") and values.axis == "token"
            and values.scheme in ("group", "cst") and keys.bits == values.bits and d >= 16
            and not d & (d - 1) and 16 <= keys.group <= 128)


def _splits(query: torch.Tensor, keys: QuantizedTensor, programs_per_sm: int) -> tuple[int, int]:
    """(key groups per split, number of splits) of a part: ~``programs_per_sm`` programs per SM in all."""
    b, hq, _ = query.shape
    n_blocks = max(1, triton.cdiv(keys.shape[2], keys.group))  # a block is one key group
    want = max(1, triton.cdiv(programs_per_sm * _sm_count(query.device), b * hq))
    per_split = triton.cdiv(n_blocks, min(n_blocks, want))
    return per_split, triton.cdiv(n_blocks, per_split)


def _launch_part(
    query: torch.Tensor, part: Segment, scaling: float, out: torch.Tensor, lse: torch.Tensor, s_offset: int,
    per_split: int, n_splits: int, num_warps: int = NUM_WARPS,
) -> None:
    """Run the part kernel, writing its ``n_splits`` partials at ``s_offset`` of ``out`` / ``lse``."""
    b, hq, d = query.shape
    keys, values = part.keys, part.values
    bits = keys.bits
    per = 8 // bits
    bias = part.bias
    has_bias = bias is not None
    if has_bias and (bias.dtype != torch.float32 or bias.stride(-1) != 1):
        bias = bias.float().contiguous()
    hkv, m = keys.shape[1], keys.shape[2]
    ks_row, ks_blk = (1, 0) if keys.scheme == "row" else (keys.scale.shape[1], 1)
    if values.scheme == "cst":  # scale [B, M]: one per (sample, token), shared by the heads
        v_strides = (m, 0, 1, 0)
    else:  # scale [B*H*M, D/GV]
        ng = d // values.group
        v_strides = (hkv * m * ng, m * ng, ng, 1)
    has_cs = values.cscale is not None
    _part_decode_kernel[(b * hq, n_splits)](
        query, keys.packed, keys.scale, keys.offset, values.packed, values.scale, values.offset,
        values.cscale.contiguous() if has_cs else out, part.index.contiguous(), bias if has_bias else out, out, lse,
        m, keys.packed.shape[1] * per, hq, hq // hkv, part.length,
        bias.stride(0) if has_bias else 0, per_split, out.shape[2], s_offset, scaling, ks_row, ks_blk, *v_strides,
        D=d, BITS=bits, PER=per, QMAX=(1 << bits) - 1, GK=keys.group, GV=values.group, HAS_BIAS=has_bias,
        HAS_CS=has_cs, num_warps=num_warps,
    )


def part_attention(
    query: torch.Tensor, part: Segment, scaling: float, programs_per_sm: int = PROGRAMS_PER_SM
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, d = query.shape
    per_split, n_splits = _splits(query, part.keys, programs_per_sm)
    out = torch.empty(b, hq, n_splits, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, hq, n_splits, dtype=torch.float32, device=query.device)
    _launch_part(query.contiguous(), part, scaling, out, lse, 0, per_split, n_splits)
    return out, lse


def decode_attention(
    query: torch.Tensor,
    parts: list[Segment],
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    bias_buf: torch.Tensor | None,
    scaling: float,
    programs_per_sm: int = PROGRAMS_PER_SM,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, d = query.shape
    query = query.contiguous()
    plans = [_splits(query, p.keys, programs_per_sm) for p in parts]
    s_total = sum(n for _, n in plans)
    out = torch.empty(b, hq, s_total, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, hq, s_total, dtype=torch.float32, device=query.device)
    offset = 0
    for part, (per_split, n_splits) in zip(parts, plans):
        _launch_part(query, part, scaling, out, lse, offset, per_split, n_splits, num_warps)
        offset += n_splits
    nb = k_buf.shape[2]
    res = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
    probs = torch.empty(b, hq, nb, dtype=torch.float32, device=query.device)
    has_bias = bias_buf is not None
    if has_bias and (bias_buf.dtype != torch.float32 or bias_buf.stride(-1) != 1):
        bias_buf = bias_buf.float().contiguous()
    if k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        k_buf, v_buf = k_buf.contiguous(), v_buf.contiguous()
    _merge_kernel[(b * hq,)](
        query, out, lse, k_buf, v_buf, bias_buf if has_bias else out, res, probs,
        s_total, nb, hq, hq // k_buf.shape[1], bias_buf.stride(0) if has_bias else 0,
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        scaling, D=d, BLOCK_S=64, BLOCK_T=32, HAS_BIAS=has_bias, num_warps=4,
    )
    return res, probs
