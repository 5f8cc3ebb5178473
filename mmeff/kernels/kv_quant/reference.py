"""Plain-torch reference of group-wise asymmetric quantization with bit packing (what CPUs use).

The core op works on a 2-D ``[rows, cols]`` tensor, ``cols`` a multiple of ``group``: every run of ``group``
consecutive columns of a row is one quantization group::

    lo = min(x_g), s = (max(x_g) - lo) / (2**bits - 1)        (s, lo rounded to the parameter dtype first)
    code = clamp(floor((x - lo) / s + 0.5), 0, 2**bits - 1)      (s == 0: code 0)
    x_hat = code * s + lo                                        |x - x_hat| <= s / 2 (+ parameter rounding)

``floor(v + 0.5)`` rather than ``round`` (half to even) so the Triton kernel gives the same codes. Codes are
packed little-end first: byte ``k`` of a row holds columns ``k*per .. k*per+per-1`` (``per = 8 // bits``) at bit
offsets ``0, bits, 2*bits, ...``.

ZipCache's channel-separable token-wise quantization (He et al., arXiv 2405.14256, Sec. 4.1; released code
``ThisisBillhe/ZipCache``) builds on the same row op: :func:`channel_scale` gives each channel's normaliser
``c_d = sqrt(max_t |x_td|)``; :func:`quantize_cst` quantizes ``x / c`` per token with one (scale, offset) over
all heads' channels of the token; dequantization multiplies ``c`` back::

    x_hat[b, h, t, d] = (code[b, h, t, d] * s[b, t] + lo[b, t]) * c[b, h, d]
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


def check_packing(bits: int, cols: int) -> None:
    """A row of ``cols`` codes packs into whole bytes (the whole-row and CST schemes need no power of two)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"kv_quant: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if cols % (8 // bits):
        raise ValueError(f"kv_quant: {cols} columns do not pack into whole bytes at {bits} bits")


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [R, C] -> (packed uint8 [R, C*bits/8], scale [R, C/group], offset [R, C/group])."""
    check(bits, group, x.shape[1])
    return quantize_groups(x, bits, group, param_dtype(x.dtype))


def quantize_groups(
    x: torch.Tensor, bits: int, group: int, pdt: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` for any ``group`` dividing the columns and a multiple of ``8 // bits`` (a whole row:
    ``group = C``), parameters stored in ``pdt``; the caller checks the shapes."""
    rows, cols = x.shape
    qmax = (1 << bits) - 1
    xg = x.float().reshape(rows, cols // group, group)
    lo = xg.amin(-1).to(pdt)
    scale = ((xg.amax(-1) - xg.amin(-1)) / qmax).to(pdt)
    s, m = scale.float()[..., None], lo.float()[..., None]
    v = torch.where(s > 0, (xg - m) / torch.where(s > 0, s, 1.0), 0.0)
    code = torch.floor(v + 0.5).clamp_(0, qmax).to(torch.int32).reshape(rows, cols)
    return pack(code, bits), scale, lo


def pack(code: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [R, C] -> uint8 [R, C*bits/8], little-end first."""
    rows, cols = code.shape
    per = 8 // bits
    shifts = torch.arange(per, device=code.device, dtype=torch.int32) * bits
    return (code.reshape(rows, cols // per, per) << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, C*bits/8] -> int32 codes [R, C] (inverse of :func:`pack`)."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    code = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return code.reshape(packed.shape[0], -1)


def dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: [R, C] in ``dtype``."""
    rows = packed.shape[0]
    cols = packed.shape[1] * (8 // bits)
    if group == cols:  # a whole row per group (ZipCache's per-channel keys): no power of two needed
        check_packing(bits, cols)
    else:
        check(bits, group, cols)
    code = unpack(packed, bits).reshape(rows, cols // group, group).float()
    x = code * scale.float()[..., None] + offset.float()[..., None]
    return x.reshape(rows, cols).to(dtype)


# -- ZipCache: channel-separable token-wise quantization ----------------------------------------------------------
def channel_scale(x: torch.Tensor) -> torch.Tensor:
    """ZipCache's channel normaliser of ``x`` [B, H, T, D]: ``c[b, h, d] = sqrt(max_t |x[b, h, t, d]|)`` over the
    tokens given (the released code takes the max over batch and tokens; we keep samples apart), stored in the
    parameter dtype; an all-zero channel gets ``c = 1`` (any value reconstructs its zeros; the released code
    divides by zero there)."""
    c = x.float().abs().amax(2).sqrt().to(param_dtype(x.dtype))
    return torch.where(c > 0, c, torch.ones_like(c))


def quantize_cst(
    x: torch.Tensor, bits: int, cscale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel-separable token-wise quantization (ZipCache Sec. 4.1) of ``x`` [B, H, M, D] with the channel
    normaliser ``cscale`` [B, H, D] (:func:`channel_scale`, usually of a larger token set): ``y = x / c``, then
    one asymmetric (scale, offset) per (sample, token) over the ``H * D`` values of all heads, as the released
    ``true_tokenwise_quantize`` does on ``[bsz, seq, heads * dim]``. Returns (packed uint8 [B*H*M, D*bits/8]
    — rows (b, h, token) as the per-token value layout, so decode reads one head's bytes contiguously —,
    scale [B, M], offset [B, M])."""
    b, h, m, d = x.shape
    check_packing(bits, d)
    y = x.float() / cscale.float()[:, :, None, :]
    rows = y.permute(0, 2, 1, 3).reshape(b * m, h * d)  # (b, token) rows over every head's channels
    packed, scale, offset = quantize_groups(rows, bits, h * d, param_dtype(x.dtype))
    packed = packed.view(b, m, h, d * bits // 8).permute(0, 2, 1, 3).reshape(b * h * m, d * bits // 8)
    return packed, scale.view(b, m), offset.view(b, m)


def dequantize_cst(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, cscale: torch.Tensor, bits: int,
    shape: tuple[int, int, int, int], dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize_cst`: [B, H, M, D] in ``dtype``."""
    b, h, m, d = shape
    code = unpack(packed, bits).view(b, h, m, d).float()
    x = code * scale.float()[:, None, :, None] + offset.float()[:, None, :, None]
    return (x * cscale.float()[:, :, None, :]).to(dtype)
