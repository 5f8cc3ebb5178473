"""Top-k selection helpers shared by the token-removing methods (ranks, keep masks, packed positions).

All of them work on whole batches on the device, without reading a count back to the host unless told so.
"""

from __future__ import annotations

import torch

from mmeff.engine.method import Kept
from mmeff.engine.state import State


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """Inverse of a per-row permutation [B, L]: each slot's place in ``order``."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, L] keep mask: every non-candidate, plus per row the round(n * (1 - ratio)) highest-scoring candidates
    (ties broken towards the earlier position)."""
    n_keep = torch.round(candidates.sum(1).double() * (1.0 - ratio)).long()
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    return ~candidates | (inverse_permutation(order) < n_keep[:, None])


def keep_top_of_state(state: State, scores: torch.Tensor, ratio: float) -> Kept:
    """:func:`keep_top` over the prunable slots of the current group; from the input group (every prompt slot)
    the kept counts come from the host-side span layout, so no count is read from the device."""
    g = state.group
    keep = keep_top(scores, state.prunable_in_group(g), ratio)
    if g is not state.groups[0] or state.host_prunable is None:
        return Kept(keep)
    n = g.index.shape[1]
    counts = [n - p + round(p * (1.0 - ratio)) for p in state.host_prunable]  # = keep_top's (half to even)
    return Kept(keep, longest=max(counts), uniform=len(set(counts)) == 1)


def rank_in_group(scores: torch.Tensor, group: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[T] ascending rank of each score within its group (ties: the earlier element), in one pass for all
    groups; ``counts[g]`` = number of elements of group g (ids 0..len(counts)-1)."""
    order = torch.sort(scores, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then ascending score, then index
    start = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group[order]]
    return rank


def true_positions(mask: torch.Tensor, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot positions [B, M] of the True entries, ascending, padded with position 0; validity [B, M]).
    ``m``: the largest row count, when the caller already knows it (saves a host read)."""
    count = mask.sum(1)
    if m is None:
        m = int(count.max()) if mask.numel() else 0
    slot = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    order = torch.where(mask, slot, slot + mask.shape[1]).argsort(1)[:, :m]
    valid = torch.arange(m, device=mask.device)[None, :] < count[:, None]
    return torch.where(valid, order, 0), valid
