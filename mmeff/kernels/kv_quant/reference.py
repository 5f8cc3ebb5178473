"""Plain-torch reference of group-wise asymmetric quantization with bit packing (what CPUs use).

The core op works on a 2-D ``[rows, cols]`` tensor, ``cols`` a multiple of ``group``: every run of ``group``
consecutive columns of a row is one quantization group::

    lo = min(x_g), s = (max(x_g) - lo) / (2**bits - 1)        (s, lo rounded to the parameter dtype first)
    code = clamp(floor((x - lo) / s + 0.5), 0, 2**bits - 1)      (s == 0: code 0)
    x_hat = code * s + lo                                        |x - x_hat| <= s / 2 (+ parameter rounding)

``floor(v + 0.5)`` rather than ``round`` (half to even) so the Triton kernel gives the same codes. Codes are
packed little-end first: byte ``k`` of a row holds columns ``k*per .. k*per+per-1`` (``per = 8 // bits``) at bit
offsets ``0, bits, 2*bits, ...``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scale/offset storage: float32 for float32 tensors, float16 otherwise (bf16 would lose ~3 decimal digits)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def check(bits: int, group: int, cols: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"kv_quant: bits must be one of {SUPPORTED_BITS}, got {bits}")
    per = 8 // bits
    if group <= 0 or group % per or group & (group - 1):
        raise ValueError(f"kv_quant: group must be a power of two and a multiple of {per} for {bits} bits, got {group}")
    if cols % group:
        raise ValueError(f"kv_quant: {cols} columns are not a multiple of the group size {group}")


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [R, C] -> (packed uint8 [R, C*bits/8], scale [R, C/group], offset [R, C/group])."""
    rows, cols = x.shape
    check(bits, group, cols)
    pdt = param_dtype(x.dtype)
    qmax = (1 << bits) - 1
    xg = x.float().reshape(rows, cols // group, group)
    lo = xg.amin(-1).to(pdt)
    scale = ((xg.amax(-1) - xg.amin(-1)) / qmax).to(pdt)
    s, m = scale.float()[..., None], lo.float()[..., None]
    v = torch.where(s > 0, (xg - m) / torch.where(s > 0, s, 1.0), 0.0)
    code = torch.floor(v + 0.5).clamp_(0, qmax).to(torch.int32).reshape(rows, cols)
    per = 8 // bits
    shifts = torch.arange(per, device=x.device, dtype=torch.int32) * bits
    packed = (code.reshape(rows, cols // per, per) << shifts).sum(-1).to(torch.uint8)
    return packed, scale, lo


def dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: [R, C] in ``dtype``."""
    per = 8 // bits
    rows = packed.shape[0]
    cols = packed.shape[1] * per
    check(bits, group, cols)
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    code = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    code = code.reshape(rows, cols // group, group).float()
    x = code * scale.float()[..., None] + offset.float()[..., None]
    return x.reshape(rows, cols).to(dtype)
