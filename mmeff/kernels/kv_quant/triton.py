"""Triton kernels for :mod:`mmeff.kernels.kv_quant.reference` (same formulas, same codes, same packing).

One program per (row, group): the group is loaded as a ``[group / per, per]`` tile so that the ``per`` codes
of one output byte sit on one tile row and are packed with a shift-and-sum, with no reshape in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmeff.kernels.kv_quant.reference import check, param_dtype

_TL_PARAM = {torch.float32: tl.float32, torch.float16: tl.float16}


@triton.jit
def _quant_kernel(
    x_ptr, packed_ptr, scale_ptr, offset_ptr,
    cols, n_groups,
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, PARAM: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    byte = tl.arange(0, GROUP // PER)
    sub = tl.arange(0, PER)
    col = g * GROUP + byte[:, None] * PER + sub[None, :]
    x = tl.load(x_ptr + row.to(tl.int64) * cols + col).to(tl.float32)
    mn = tl.min(tl.min(x, axis=1), axis=0)
    mx = tl.max(tl.max(x, axis=1), axis=0)
    lo = mn.to(PARAM)
    scale = ((mx - mn) / QMAX).to(PARAM)
    tl.store(scale_ptr + row.to(tl.int64) * n_groups + g, scale)
    tl.store(offset_ptr + row.to(tl.int64) * n_groups + g, lo)
    s = scale.to(tl.float32)
    m = lo.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)
    v = tl.where(s > 0, (x - m) / safe, 0.0)
    code = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), QMAX).to(tl.int32)
    word = tl.sum(code << (sub[None, :] * BITS), axis=1)
    tl.store(packed_ptr + row.to(tl.int64) * (cols // PER) + g * (GROUP // PER) + byte, word.to(tl.uint8))


@triton.jit
def _dequant_kernel(
    packed_ptr, scale_ptr, offset_ptr, out_ptr,
    cols, n_groups,
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    byte = tl.arange(0, GROUP // PER)
    sub = tl.arange(0, PER)
    word = tl.load(packed_ptr + row.to(tl.int64) * (cols // PER) + g * (GROUP // PER) + byte).to(tl.int32)
    code = (word[:, None] >> (sub[None, :] * BITS)) & QMAX
    s = tl.load(scale_ptr + row.to(tl.int64) * n_groups + g).to(tl.float32)
    m = tl.load(offset_ptr + row.to(tl.int64) * n_groups + g).to(tl.float32)
    x = code.to(tl.float32) * s + m
    col = g * GROUP + byte[:, None] * PER + sub[None, :]
    tl.store(out_ptr + row.to(tl.int64) * cols + col, x.to(out_ptr.dtype.element_ty))


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    check(bits, group, cols)
    x = x.contiguous()
    per = 8 // bits
    pdt = param_dtype(x.dtype)
    packed = torch.empty(rows, cols // per, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, cols // group, dtype=pdt, device=x.device)
    offset = torch.empty_like(scale)
    if rows and cols:
        _quant_kernel[(rows, cols // group)](
            x, packed, scale, offset, cols, cols // group,
            BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, PER=per, PARAM=_TL_PARAM[pdt],
        )
    return packed, scale, offset


def dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    per = 8 // bits
    rows, cols = packed.shape[0], packed.shape[1] * per
    check(bits, group, cols)
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    if rows and cols:
        _dequant_kernel[(rows, cols // group)](
            packed.contiguous(), scale.contiguous(), offset.contiguous(), out, cols, cols // group,
            BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, PER=per,
        )
    return out
