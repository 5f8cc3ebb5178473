"""Decode attention straight from ZipVL's quantized KV cache: no dequantized copy of the layer is built.

:func:`decode_attention` is a layer's whole decode step: every quantized part's ``(out, lse)`` partials merged
with the full-precision buffer. On CUDA (Triton importable) each part goes through the fused split-K kernel
(unpack the codes, fold in the scales, online softmax, one pass over the packed bytes) and one merge kernel
finishes; elsewhere the torch reference dequantizes, then attends. :mod:`.reference` states the formulas.
"""

from __future__ import annotations

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.quant_attention import reference
from mmeff.kernels.quant_attention.reference import Segment


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
    if use_triton(query):
        from mmeff.kernels.quant_attention import triton as kernel

        if all(kernel.supports(p.keys, p.values) for p in parts):
            return kernel.decode_attention(query, parts, k_buf, v_buf, bias_buf, scaling)
    return reference.decode_attention(query, parts, k_buf, v_buf, bias_buf, scaling)


__all__ = ["Segment", "decode_attention"]
