"""Triton kernels for :mod:`mmeff.kernels.kv_quant.reference` (same formulas, same codes, same packing).

Each group is loaded as a ``[group / per, per]`` tile so that the ``per`` codes of one output byte sit on one
tile row and are packed with a shift-and-sum, with no reshape in the kernel. A program handles a block of
~2k elements (one (row, group) per program left the GPU idle between tiny programs: 10x the bytes floor).
The cache-facing kernels read ``[B, H, T, D]`` tensors in place and gather the tokens of a precision class
themselves (``index``), so no gathered, transposed or padded copy is made: values per token
(:func:`quantize_tokens`), keys per channel (:func:`quantize_channels`, one program per (b*h, token group)
over all channels, coalesced along the head dimension).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmeff.kernels.kv_quant.reference import check, check_packing, param_dtype

_TL_PARAM = {torch.float32: tl.float32, torch.float16: tl.float16}


@triton.jit
def _codes(x, lo, scale, QMAX: tl.constexpr):
    """Codes of ``x`` (float32) for a group's offset and scale (parameter dtype): the reference's formula."""
    s = scale.to(tl.float32)
    m = lo.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)
    v = tl.where(s > 0, (x - m) / safe, 0.0)
    return tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), QMAX).to(tl.int32)


@triton.jit
def _quant_kernel(
    x_ptr, packed_ptr, scale_ptr, offset_ptr,
    n_groups_total, groups_per_row, rows_per_bh, src_bh_stride, src_row_stride, idx_ptr, idx_b_stride, BH_PER_B,
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, PARAM: tl.constexpr,
    BLOCK_G: tl.constexpr, GATHER: tl.constexpr,
):
    """BLOCK_G consecutive groups of the output rows; an output row r = (bh, m) reads source row
    ``idx[b, m]`` (GATHER) or ``m`` of head ``bh``, whose columns are contiguous."""
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = gid < n_groups_total
    row = gid // groups_per_row
    gcol = gid % groups_per_row
    bh = row // rows_per_bh
    m = row % rows_per_bh
    if GATHER:
        m = tl.load(idx_ptr + (bh // BH_PER_B) * idx_b_stride + m, mask=ok, other=0).to(tl.int64)
    base = bh * src_bh_stride + m * src_row_stride + gcol * GROUP
    byte = tl.arange(0, GROUP // PER)
    sub = tl.arange(0, PER)
    col = byte[:, None] * PER + sub[None, :]
    x = tl.load(x_ptr + base[:, None, None] + col[None, :, :], mask=ok[:, None, None], other=0.0).to(tl.float32)
    mn = tl.min(tl.min(x, axis=2), axis=1)
    mx = tl.max(tl.max(x, axis=2), axis=1)
    lo = mn.to(PARAM)
    scale = ((mx - mn) / QMAX).to(PARAM)
    tl.store(scale_ptr + gid, scale, mask=ok)
    tl.store(offset_ptr + gid, lo, mask=ok)
    code = _codes(x, lo[:, None, None], scale[:, None, None], QMAX)
    word = tl.sum(code << (sub[None, None, :] * BITS), axis=2)
    tl.store(packed_ptr + gid[:, None] * (GROUP // PER) + byte[None, :], word.to(tl.uint8), mask=ok[:, None])


@triton.jit
def _quant_keys_kernel(
    x_ptr, packed_ptr, scale_ptr, offset_ptr,
    H, T, M, n_tgroups, idx_ptr, idx_b_stride,
    D: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
    PARAM: tl.constexpr, GATHER: tl.constexpr,
):
    """Keys, per channel: one program per (b*h, group of GROUP tokens) over all D channels of a contiguous
    [B, H, T, D] tensor; the tokens are ``idx[b, :M]`` (GATHER) or ``0..M-1``, the last repeated to fill the
    final group. Output rows are (b, h, channel), as the transposed reference lays them out."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    byte = tl.arange(0, GROUP // PER)
    sub = tl.arange(0, PER)
    d = tl.arange(0, D)
    t = tl.minimum(j * GROUP + byte[:, None] * PER + sub[None, :], M - 1)  # [GB, PER]
    if GATHER:
        t = tl.load(idx_ptr + (bh // H) * idx_b_stride + t)
    src = x_ptr + bh * T * D + t.to(tl.int64)[:, :, None] * D + d[None, None, :]
    x = tl.load(src).to(tl.float32)  # [GB, PER, D]
    mn = tl.min(tl.min(x, axis=1), axis=0)
    mx = tl.max(tl.max(x, axis=1), axis=0)
    lo = mn.to(PARAM)
    scale = ((mx - mn) / QMAX).to(PARAM)
    out_row = bh * D + d  # [D]
    tl.store(scale_ptr + out_row * n_tgroups + j, scale)
    tl.store(offset_ptr + out_row * n_tgroups + j, lo)
    code = _codes(x, lo[None, None, :], scale[None, None, :], QMAX)
    word = tl.sum(code << (sub[None, :, None] * BITS), axis=1)  # [GB, D]
    row_bytes = n_tgroups * (GROUP // PER)
    tl.store(packed_ptr + out_row[None, :] * row_bytes + j * (GROUP // PER) + byte[:, None], word.to(tl.uint8))


@triton.jit
def _dequant_kernel(
    packed_ptr, scale_ptr, offset_ptr, out_ptr, n_groups_total,
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, BLOCK_G: tl.constexpr,
):
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = gid < n_groups_total
    byte = tl.arange(0, GROUP // PER)
    sub = tl.arange(0, PER)
    word = tl.load(packed_ptr + gid[:, None] * (GROUP // PER) + byte[None, :], mask=ok[:, None], other=0).to(tl.int32)
    code = (word[:, :, None] >> (sub[None, None, :] * BITS)) & QMAX
    s = tl.load(scale_ptr + gid, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(offset_ptr + gid, mask=ok, other=0.0).to(tl.float32)
    x = code.to(tl.float32) * s[:, None, None] + m[:, None, None]
    col = byte[:, None] * PER + sub[None, :]
    tl.store(out_ptr + gid[:, None, None] * GROUP + col[None, :, :], x.to(out_ptr.dtype.element_ty),
             mask=ok[:, None, None])


def _block_g(group: int) -> int:
    return max(1, 2048 // group)  # ~2k elements per program


def _params(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    pdt = param_dtype(x.dtype)
    scale = torch.empty(n, dtype=pdt, device=x.device)
    return scale, torch.empty_like(scale), pdt


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    return quantize_tokens(x.reshape(1, 1, rows, cols), bits, group, None)  # one head, rows as tokens


def quantize_tokens(
    x: torch.Tensor, bits: int, group: int, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values, per token: ``x`` [B, H, T, D] (tokens ``index`` [B, M] if given) -> rows (b, h, m) of D columns
    in groups of ``group`` channels; equals ``quantize_rows`` of the gathered ``[B*H*M, D]`` tensor."""
    b, h, t, d = x.shape
    check(bits, group, d)
    x = x.contiguous()
    m = t if index is None else index.shape[1]
    idx = x if index is None else index.contiguous()
    per = 8 // bits
    rows = b * h * m
    packed = torch.empty(rows, d // per, dtype=torch.uint8, device=x.device)
    n = rows * (d // group)
    scale, offset, pdt = _params(x, n)
    if n:
        bg = _block_g(group)
        _quant_kernel[(triton.cdiv(n, bg),)](
            x, packed, scale, offset, n, d // group, m, t * d, d, idx, m, h,
            BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, PER=per, PARAM=_TL_PARAM[pdt], BLOCK_G=bg,
            GATHER=index is not None,
        )
    return packed, scale.view(rows, d // group), offset.view(rows, d // group)


def quantize_channels(
    x: torch.Tensor, bits: int, group: int, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, per channel: ``x`` [B, H, T, D] (tokens ``index`` [B, M] if given) -> rows (b, h, channel) of the
    M tokens padded to a multiple of ``group`` with the last token; equals the reference's transposed layout."""
    b, h, t, d = x.shape
    m = t if index is None else index.shape[1]
    mp = m + (-m % group)
    check(bits, group, mp)
    if d & (d - 1):
        raise ValueError(f"kv_quant: the fused key kernel needs a power-of-two head dim, got {d}")
    x = x.contiguous()
    per = 8 // bits
    n_tg = mp // group
    packed = torch.empty(b * h * d, mp // per, dtype=torch.uint8, device=x.device)
    scale, offset, pdt = _params(x, b * h * d * n_tg)
    if m:
        _quant_keys_kernel[(b * h, n_tg)](
            x, packed, scale, offset, h, t, m, n_tg, x if index is None else index.contiguous(), m,
            D=d, BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, PER=per, PARAM=_TL_PARAM[pdt],
            GATHER=index is not None,
        )
    return packed, scale.view(b * h * d, n_tg), offset.view(b * h * d, n_tg)


def dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    per = 8 // bits
    rows, cols = packed.shape[0], packed.shape[1] * per
    check(bits, group, cols)
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    n = rows * (cols // group)
    if n:
        bg = _block_g(group)
        _dequant_kernel[(triton.cdiv(n, bg),)](
            packed.contiguous(), scale.contiguous(), offset.contiguous(), out, n,
            BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, PER=per, BLOCK_G=bg,
        )
    return out


# -- ZipCache's layouts (quantizer="zipcache" / "cst") ----------------------------------------------------------
@triton.jit
def _quant_cst_kernel(
    x_ptr, c_ptr, packed_ptr, scale_ptr, offset_ptr, H, T, M, idx_ptr,
    HP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, PER: tl.constexpr,
    PARAM: tl.constexpr, GATHER: tl.constexpr,
):
    """Channel-separable token-wise: one program per (b, m) over every head's channels of token ``idx[b, m]``
    (GATHER) or ``m``: ``y = x / c[b]``, one (scale, offset) over the token's H*D values, codes packed into
    the rows (b, h, m) of D columns."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // M
    m = pid % M
    t = m
    if GATHER:
        t = tl.load(idx_ptr + b * M + m).to(tl.int64)
    h = tl.arange(0, HP)
    hm = h < H
    byte = tl.arange(0, D // PER)
    sub = tl.arange(0, PER)
    col = (byte[:, None] * PER + sub[None, :])[None, :, :]  # [1, D / PER, PER]
    head = (b * H + h.to(tl.int64))[:, None, None]
    ok = hm[:, None, None]
    x = tl.load(x_ptr + (head * T + t) * D + col, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + head * D + col, mask=ok, other=1.0).to(tl.float32)
    y = tl.math.div_rn(x, c)  # the reference's IEEE division
    mn = tl.min(tl.min(tl.min(tl.where(ok, y, float("inf")), axis=2), axis=1), axis=0)
    mx = tl.max(tl.max(tl.max(tl.where(ok, y, float("-inf")), axis=2), axis=1), axis=0)
    lo = mn.to(PARAM)
    scale = ((mx - mn) / QMAX).to(PARAM)
    tl.store(scale_ptr + pid, scale)
    tl.store(offset_ptr + pid, lo)
    code = _codes(y, lo, scale, QMAX)
    word = tl.sum(code << (sub[None, None, :] * BITS), axis=2)  # [HP, D / PER]
    out_row = (b * H + h.to(tl.int64)) * M + m
    tl.store(packed_ptr + out_row[:, None] * (D // PER) + byte[None, :], word.to(tl.uint8), mask=hm[:, None])


@triton.jit
def _quant_keys_whole_kernel(
    x_ptr, packed_ptr, scale_ptr, offset_ptr, H, T, M, MP, idx_ptr,
    D: tl.constexpr, DB: tl.constexpr, TB: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
    PER: tl.constexpr, PARAM: tl.constexpr, GATHER: tl.constexpr,
):
    """Keys per channel over the whole part: one program per (b*h, DB channels); pass 1 takes each channel's
    min / max over the MP tokens (``idx[b, :M]`` or ``0..M-1``, the last repeated up to MP: min/max unchanged),
    pass 2 writes the codes, PER consecutive tokens per byte, into the rows (b, h, channel)."""
    bh = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * DB + tl.arange(0, DB)
    b = bh // H
    mn = tl.full([DB], float("inf"), tl.float32)
    mx = tl.full([DB], float("-inf"), tl.float32)
    for start in range(0, MP, TB):
        t = tl.minimum(start + tl.arange(0, TB), M - 1)
        if GATHER:
            t = tl.load(idx_ptr + b * M + t)
        x = tl.load(x_ptr + (bh * T + t.to(tl.int64))[:, None] * D + d[None, :]).to(tl.float32)
        mn = tl.minimum(mn, tl.min(x, axis=0))
        mx = tl.maximum(mx, tl.max(x, axis=0))
    lo = mn.to(PARAM)
    scale = ((mx - mn) / QMAX).to(PARAM)
    out_row = bh * D + d
    tl.store(scale_ptr + out_row, scale)
    tl.store(offset_ptr + out_row, lo)
    byte = tl.arange(0, TB // PER)
    sub = tl.arange(0, PER)
    row_bytes = MP // PER
    for start in range(0, MP, TB):
        t = tl.minimum(start + byte[:, None] * PER + sub[None, :], M - 1)  # [TB / PER, PER]
        if GATHER:
            t = tl.load(idx_ptr + b * M + t)
        x = tl.load(x_ptr + (bh * T + t.to(tl.int64))[:, :, None] * D + d[None, None, :]).to(tl.float32)
        code = _codes(x, lo[None, None, :], scale[None, None, :], QMAX)
        word = tl.sum(code << (sub[None, :, None] * BITS), axis=1)  # [TB / PER, DB]
        col = start // PER + byte
        tl.store(packed_ptr + out_row[None, :] * row_bytes + col[:, None], word.to(tl.uint8),
                 mask=(col < row_bytes)[:, None])


def quantize_cst(
    x: torch.Tensor, bits: int, cscale: torch.Tensor, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reference.quantize_cst` of ``x`` [B, H, T, D] (tokens ``index`` [B, M] if given, gathered as read),
    the normalisers ``cscale`` [B, H, D]: (packed [B*H*M, D*bits/8], scale [B, M], offset [B, M])."""
    b, h, t, d = x.shape
    check_packing(bits, d)
    if d & (d - 1):
        raise ValueError(f"kv_quant: the fused channel-separable kernel needs a power-of-two head dim, got {d}")
    x = x.contiguous()
    m = t if index is None else index.shape[1]
    per = 8 // bits
    packed = torch.empty(b * h * m, d // per, dtype=torch.uint8, device=x.device)
    scale, offset, pdt = _params(x, b * m)
    if b * m:
        _quant_cst_kernel[(b * m,)](
            x, cscale.contiguous(), packed, scale, offset, h, t, m, x if index is None else index.contiguous(),
            HP=triton.next_power_of_2(h), D=d, BITS=bits, QMAX=(1 << bits) - 1, PER=per, PARAM=_TL_PARAM[pdt],
            GATHER=index is not None,
        )
    return packed, scale.view(b, m), offset.view(b, m)


def quantize_channels_whole(
    x: torch.Tensor, bits: int, block: int, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys per channel over the whole part (:func:`mmeff.kernels.kv_quant.quantize_channels_whole`): ``x``
    [B, H, T, D] (tokens ``index`` [B, M], M > 0) -> rows (b, h, channel) of the M tokens padded to a multiple of
    ``block`` with the last one: (packed [B*H*D, MP*bits/8], scale [B*H*D, 1], offset [B*H*D, 1])."""
    b, h, t, d = x.shape
    m = t if index is None else index.shape[1]
    mp = m + (-m % block)
    check_packing(bits, mp)
    if d & (d - 1):
        raise ValueError(f"kv_quant: the fused key kernel needs a power-of-two head dim, got {d}")
    x = x.contiguous()
    per = 8 // bits
    packed = torch.empty(b * h * d, mp // per, dtype=torch.uint8, device=x.device)
    scale, offset, pdt = _params(x, b * h * d)
    db = min(d, 32)
    _quant_keys_whole_kernel[(b * h, d // db)](
        x, packed, scale, offset, h, t, m, mp, x if index is None else index.contiguous(),
        D=d, DB=db, TB=64, BITS=bits, QMAX=(1 << bits) - 1, PER=per, PARAM=_TL_PARAM[pdt],
        GATHER=index is not None,
    )
    return packed, scale.view(-1, 1), offset.view(-1, 1)
