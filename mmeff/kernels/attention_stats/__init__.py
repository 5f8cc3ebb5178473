"""Attention received per key, without materialising the whole attention matrix at once.

``received_attention`` dispatches to the Triton kernel (``triton.py``) for CUDA tensors when Triton is importable
and the visibility pattern is given as positions (``geometry``), and to the torch reference (``reference.py``)
otherwise.
"""

from __future__ import annotations

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.attention_stats.reference import attention_probs
from mmeff.kernels.attention_stats.reference import received_attention as received_attention_reference

Geometry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q_pos [B, q], k_pos [B, k], k_valid [B, k])


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    query_weights: torch.Tensor | None = None,
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """[B, k] attention each key receives, mean over heads and the weighted query rows."""
    if geometry is not None and use_triton(query):
        from mmeff.kernels.attention_stats.triton import received_attention_triton

        return received_attention_triton(query, key, *geometry, scaling, query_weights)
    return received_attention_reference(query, key, mask, scaling, query_weights)


__all__ = ["attention_probs", "received_attention", "received_attention_reference"]
