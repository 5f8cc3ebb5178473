"""Group-wise asymmetric KV quantization with bit packing (ZipVL's mixed-precision cache).

``quantize_rows`` / ``dequantize_rows`` dispatch to the Triton kernels on CUDA when Triton is importable and
to the torch reference otherwise. :func:`quantize_kv` applies them to ``[B, H, T, D]`` cache tensors:

* ``axis="channel"`` (keys): each (b, h, channel) is quantized in groups of ``group`` consecutive tokens (the
  token axis is padded to a multiple of ``group`` by repeating the last token, which leaves min/max unchanged);
* ``axis="token"`` (values): each (b, h, token) is quantized in groups of ``min(group, D)`` channels.

``bits=16`` stores the tensor unchanged (the lossless setting of the equivalence tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.kv_quant import reference

Axis = Literal["channel", "token"]


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from mmeff.kernels.kv_quant import triton as kernel

        return kernel.quantize_rows(x, bits, group)
    return reference.quantize_rows(x, bits, group)


def dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    if use_triton(packed):
        from mmeff.kernels.kv_quant import triton as kernel

        return kernel.dequantize_rows(packed, scale, offset, bits, group, dtype)
    return reference.dequantize_rows(packed, scale, offset, bits, group, dtype)


@dataclass
class QuantizedTensor:
    """A quantized ``[B, H, T, D]`` tensor: packed codes plus per-group scale and offset (or the raw tensor)."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    bits: int
    group: int
    axis: Axis
    packed: torch.Tensor  # uint8 codes, or the tensor itself when bits == 16
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset) if t is not None)

    def dequantize(self) -> torch.Tensor:
        if self.bits == 16:
            return self.packed
        b, h, t, d = self.shape
        if t == 0:
            return torch.empty(self.shape, dtype=self.dtype, device=self.packed.device)
        x = dequantize_rows(self.packed, self.scale, self.offset, self.bits, self.group, self.dtype)
        if self.axis == "token":
            return x.view(b, h, t, d)
        return x.view(b, h, d, -1)[..., :t].transpose(-1, -2)


def value_group(group: int, head_dim: int) -> int:
    """Channel group of per-token (value) quantization: ``group`` capped at the head dimension."""
    g = min(group, head_dim)
    if head_dim % g:
        raise ValueError(f"kv_quant: head_dim {head_dim} is not a multiple of the group size {g}")
    return g


def gather_tokens(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``index`` [B, M] (per sample) of ``x`` [B, H, T, D]; all of them for None."""
    if index is None:
        return x
    if x.shape[0] == 1:  # whole rows: index_select is ~2x faster than an expanded-index gather
        return x.index_select(2, index[0])
    return torch.gather(x, 2, index[:, None, :, None].expand(x.shape[0], x.shape[1], index.shape[1], x.shape[3]))


def quantize_kv(
    x: torch.Tensor, bits: int, group: int, axis: Axis, index: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantize a ``[B, H, T, D]`` key (``axis="channel"``) or value (``axis="token"``) tensor, or only its
    tokens ``index`` [B, M] (the Triton kernels gather them as they read; the reference gathers first)."""
    b, h, t, d = x.shape
    m = t if index is None else index.shape[1]
    if bits == 16:
        return QuantizedTensor((b, h, m, d), x.dtype, 16, group, axis, gather_tokens(x, index).contiguous())
    if axis not in ("channel", "token"):
        raise ValueError(f"kv_quant: axis must be 'channel' or 'token', got {axis!r}")
    g = value_group(group, d) if axis == "token" else group
    if use_triton(x) and (axis == "token" or not d & (d - 1)):
        from mmeff.kernels.kv_quant import triton as kernel

        fn = kernel.quantize_tokens if axis == "token" else kernel.quantize_channels
        packed, scale, offset = fn(x, bits, g, index)
        return QuantizedTensor((b, h, m, d), x.dtype, bits, g, axis, packed, scale, offset)
    x = gather_tokens(x, index)
    if axis == "token":
        rows = x.reshape(b * h * m, d)
    else:
        pad = -m % g
        xt = x.transpose(-1, -2)  # [B, H, D, M]: groups run along tokens
        if pad and m:
            xt = torch.cat([xt, xt[..., -1:].expand(b, h, d, pad)], -1)
        rows = xt.reshape(b * h * d, m + (pad if m else 0))
    packed, scale, offset = quantize_rows(rows, bits, g)
    return QuantizedTensor((b, h, m, d), x.dtype, bits, g, axis, packed, scale, offset)


__all__ = ["QuantizedTensor", "dequantize_rows", "gather_tokens", "quantize_kv", "quantize_rows", "value_group"]
