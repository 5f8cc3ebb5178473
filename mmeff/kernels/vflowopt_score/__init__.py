"""VFlowOpt's importance-map ops: patch entropy and attention context relevance.

``patch_entropy`` and ``context_relevance`` run the Triton kernels when the tensors are on CUDA and Triton
imports, and the torch reference otherwise (CPU tests, other devices). Both give the same numbers (float32
accumulation; ``tests/kernels/test_vflowopt_score.py`` pins them on a GPU).
"""

from __future__ import annotations

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.vflowopt_score import reference
from mmeff.kernels.vflowopt_score.reference import Relevance, grey_levels


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """[N, P] integer grey levels (0..255) -> [N] entropy in bits."""
    if use_triton(levels):
        from mmeff.kernels.vflowopt_score import triton as kernel

        return kernel.patch_entropy(levels)
    return reference.patch_entropy(levels)


def context_relevance(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_id: torch.Tensor, unit_id: torch.Tensor, t: float,
    n_units: int | None = None, t_max: float | None = None, details: bool = False,
) -> torch.Tensor | Relevance:
    """[S] context relevance of each token of a packed sequence (q, k: [H, S, D]); see ``reference``.
    ``n_units``: the number of units when the caller knows it (saves a host sync); ``t_max``: the bounded
    global-token threshold (ours); ``details``: also the per-unit empty-G flags and |G| (:class:`Relevance`)."""
    if use_triton(q):
        from mmeff.kernels.vflowopt_score import triton as kernel

        return kernel.context_relevance(q, k, scale, block_id, unit_id, t, n_units, t_max, details)
    return reference.context_relevance(q, k, scale, block_id, unit_id, t, n_units, t_max, details)


__all__ = ["Relevance", "context_relevance", "grey_levels", "patch_entropy", "reference"]
