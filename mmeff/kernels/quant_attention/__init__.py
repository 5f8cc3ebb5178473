"""Decode attention straight from ZipVL's quantized KV cache: no dequantized copy of the layer is built.

:func:`part_attention` dispatches to the fused Triton split-K kernel (unpack codes, dequantize, online
softmax, one pass over the packed bytes) on CUDA when Triton is importable, and to the torch reference
(dequantize, then attend) otherwise. :func:`decode_attention` is a layer's whole decode step: every part's
``(out, lse)`` partials merged with the full-precision buffer; see :mod:`.reference` for the formulas.
"""

from __future__ import annotations

import torch

from mmeff.kernels.kv_quant import QuantizedTensor
from mmeff.kernels.quant_attention import reference
from mmeff.kernels.quant_attention.reference import Segment, finish, part_bias, segment_attention, segment_scores

try:  # Triton is an optional, GPU-only dependency
    from mmeff.kernels.quant_attention import triton as _triton
except ImportError:  # pragma: no cover - depends on the environment
    _triton = None


def _fused(query: torch.Tensor, parts: list[Segment]) -> bool:
    return _triton is not None and query.is_cuda and all(_triton.supports(p.keys, p.values) for p in parts)


def part_attention(
    query: torch.Tensor,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    index: torch.Tensor,
    length: int,
    bias: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, S, D], lse [B, Hq, S]) float32 partials of one query row [B, Hq, D] over a quantized part."""
    impl = _triton if _fused(query, [Segment(keys, values, index, length, bias)]) else reference
    return impl.part_attention(query, keys, values, index, length, bias, scaling)


def decode_attention(
    query: torch.Tensor,
    parts: list[Segment],
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    bias_buf: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode row's attention over quantized ``parts`` and a full-precision buffer [B, Hkv, NB, D]:
    (out [B, Hq, D] in the query's dtype, the buffer tokens' probabilities [B, Hq, NB] float32). On CUDA: one
    fused kernel per part and one merge kernel, whatever the number of parts."""
    impl = _triton if _fused(query, parts) else reference
    return impl.decode_attention(query, parts, k_buf, v_buf, bias_buf, scaling)


__all__ = ["Segment", "decode_attention", "finish", "part_attention", "part_bias", "segment_attention",
           "segment_scores"]
