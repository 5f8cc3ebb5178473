"""Group-wise asymmetric KV quantization with bit packing (ZipVL's mixed-precision cache).

``quantize_rows`` / ``dequantize_rows`` dispatch to the Triton kernels on CUDA when Triton is importable and
to the torch reference otherwise. :func:`quantize_kv` applies them to ``[B, H, T, D]`` cache tensors:

* ``axis="channel"`` (keys): each (b, h, channel) is quantized in groups of ``group`` consecutive tokens (the
  token axis is padded to a multiple of ``group`` by repeating the last token, which leaves min/max unchanged);
* ``axis="token"`` (values): each (b, h, token) is quantized in groups of ``min(group, D)`` channels.

``bits=16`` stores the tensor unchanged (the lossless setting of the equivalence tests). That is the KIVI-style
layout (Liu et al., arXiv 2402.02750): scheme ``"group"``. ZipCache's (arXiv 2405.14256) layouts,
:func:`quantize_key_value` with ``quantizer="zipcache"`` (the released code's demo setting) or ``"cst"``:

* scheme ``"row"`` (keys, released ``mixed_channelwiseQ``): one (scale, offset) per (sample, head, channel) over
  every token of the part — rows (b, h, channel), padded to a multiple of ``group`` tokens (the decode kernel's
  tile) by repeating the last token;
* scheme ``"cst"`` (values, released ``channel_separate_mixed_tokenwiseQ``; keys too with ``"cst"``):
  channel-separable token-wise — ``c[b, h, d] = sqrt(max_t |x|)`` over the whole block (shared by its
  precision classes, as the released code computes it before the split), then one (scale, offset) per (sample,
  token) over all heads' channels of ``x / c``.

Bytes held per part (``QuantizedTensor.tensors``): codes, plus per scheme ``group``: 2 parameters per group;
``row``: 2 per (sample, head, channel); ``cst``: 2 per (sample, token) and the block's ``H * D`` normalisers per
sample (one tensor object shared by the block's parts, so a layer counting by identity counts it once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.kv_quant import reference

Axis = Literal["channel", "token"]
Scheme = Literal["group", "row", "cst"]
Quantizer = Literal["zipcache", "cst", "kivi"]
QUANTIZERS: tuple[str, ...] = ("zipcache", "cst", "kivi")


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
    scheme: Scheme = "group"
    cscale: torch.Tensor | None = None  # "cst": the block's channel normalisers [B, H, D] (shared between parts)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this holds (codes, parameters, normalisers): what its bytes are."""
        return [t for t in (self.packed, self.scale, self.offset, self.cscale) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self) -> torch.Tensor:
        if self.bits == 16:
            return self.packed
        b, h, t, d = self.shape
        if t == 0:
            return torch.empty(self.shape, dtype=self.dtype, device=self.packed.device)
        if self.scheme == "cst":
            return reference.dequantize_cst(self.packed, self.scale, self.offset, self.cscale, self.bits, self.shape,
                                            self.dtype)
        if self.scheme == "row":  # one group per row: the torch op (any device) takes non-power-of-two rows
            cols = self.packed.shape[1] * (8 // self.bits)
            x = reference.dequantize_rows(self.packed, self.scale, self.offset, self.bits, cols, self.dtype)
            return x.view(b, h, d, -1)[..., :t].transpose(-1, -2)
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


def quantize_channels_whole(
    x: torch.Tensor, bits: int, block: int, index: torch.Tensor | None = None
) -> QuantizedTensor:
    """ZipCache's keys (released ``true_channel_wise_quantize``): ``x`` [B, H, T, D] (tokens ``index`` [B, M])
    with one asymmetric (scale, offset) per (sample, head, channel) over all M tokens::

        lo = min_t x[b,h,t,d],  s = (max_t x[b,h,t,d] - lo) / (2**bits - 1),  code = floor((x - lo) / s + 0.5)

    (the released code shares them over the batch and rounds half to even; we keep samples apart and round as
    the other schemes). Rows (b, h, channel), the M
    tokens padded to a multiple of ``block`` with the last one — the decode kernel's tile; min/max unchanged.
    On CUDA a Triton kernel reads the tokens in place (same parameters and codes: ties aside, one division)."""
    m = x.shape[2] if index is None else index.shape[1]
    if use_triton(x) and m and not x.shape[3] & (x.shape[3] - 1):
        from mmeff.kernels.kv_quant import triton as kernel

        packed, scale, offset = kernel.quantize_channels_whole(x, bits, block, index)
        return QuantizedTensor((x.shape[0], x.shape[1], m, x.shape[3]), x.dtype, bits, block, "channel", packed, scale,
                               offset, "row")
    x = gather_tokens(x, index)
    b, h, m, d = x.shape
    pad = -m % block
    xt = x.transpose(-1, -2)
    if pad and m:
        xt = torch.cat([xt, xt[..., -1:].expand(b, h, d, pad)], -1)
    cols = m + (pad if m else 0)
    reference.check_packing(bits, cols)
    rows = xt.reshape(b * h * d, cols)
    packed, scale, offset = reference.quantize_groups(rows, bits, max(cols, 1), reference.param_dtype(x.dtype))
    return QuantizedTensor((b, h, m, d), x.dtype, bits, block, "channel", packed, scale, offset, "row")


def quantize_tokens_cst(
    x: torch.Tensor, bits: int, cscale: torch.Tensor, index: torch.Tensor | None = None
) -> QuantizedTensor:
    """ZipCache's channel-separable token-wise quantization (:func:`reference.quantize_cst`) of ``x`` [B, H, T, D]
    (tokens ``index`` [B, M]) with the block's normalisers ``cscale`` [B, H, D]; a Triton kernel on CUDA (the
    tokens read in place), the torch reference elsewhere."""
    b, h, _, d = x.shape
    m = x.shape[2] if index is None else index.shape[1]
    if use_triton(x) and not d & (d - 1):
        from mmeff.kernels.kv_quant import triton as kernel

        packed, scale, offset = kernel.quantize_cst(x, bits, cscale, index)
        return QuantizedTensor((b, h, m, d), x.dtype, bits, d, "token", packed, scale, offset, "cst", cscale)
    x = gather_tokens(x, index)
    packed, scale, offset = reference.quantize_cst(x, bits, cscale)
    return QuantizedTensor((b, h, m, d), x.dtype, bits, d, "token", packed, scale, offset, "cst", cscale)


def block_scales(
    keys: torch.Tensor, values: torch.Tensor, quantizer: Quantizer
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The channel normalisers of a whole block [B, H, T, D] for ``quantizer`` (None where it has none): ZipCache
    computes them on the tensor before splitting it into precision classes, so both classes share them."""
    ck = reference.channel_scale(keys) if quantizer == "cst" else None
    cv = reference.channel_scale(values) if quantizer in ("zipcache", "cst") else None
    return ck, cv


def quantize_key_value(
    keys: torch.Tensor, values: torch.Tensor, bits: int, group: int, quantizer: Quantizer,
    index: torch.Tensor | None = None, scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """One precision class (tokens ``index``) of a block's keys and values at ``bits``:

    * ``"zipcache"`` — the released ZipCache demo: keys per channel over the part (``"row"``), values
      channel-separable token-wise (``"cst"``) with the block's normalisers ``scales[1]``;
    * ``"cst"`` — channel-separable token-wise for both (the one-line summary of ZipCache in our reference notes);
    * ``"kivi"`` — ours before: keys per channel over groups of ``group`` tokens, values per token over groups
      of ``group`` channels (KIVI's layout).

    ``bits = 16`` stores the tokens unquantized whatever the quantizer."""
    if bits == 16 or quantizer == "kivi":
        return quantize_kv(keys, bits, group, "channel", index), quantize_kv(values, bits, group, "token", index)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"kv_quant: quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    ck, cv = scales
    if cv is None or (quantizer == "cst" and ck is None):
        raise ValueError(f"kv_quant: quantizer {quantizer!r} needs the block's channel scales (block_scales)")
    k = quantize_tokens_cst(keys, bits, ck, index) if quantizer == "cst" else quantize_channels_whole(
        keys, bits, group, index)
    return k, quantize_tokens_cst(values, bits, cv, index)


__all__ = ["QUANTIZERS", "QuantizedTensor", "Quantizer", "block_scales", "dequantize_rows", "gather_tokens",
           "quantize_channels_whole", "quantize_key_value", "quantize_kv", "quantize_rows", "quantize_tokens_cst",
           "value_group"]
