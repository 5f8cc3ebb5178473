"""Torch reference of VFlowOpt's importance map: patch information entropy and attention context relevance.

Both ops work on a *packed* sequence, as the vision towers run it:

* ``grey_levels``: pixels (already un-normalised to [0, 1]) -> integer grey levels 0..255, the way the official
  code makes them (each channel ``x * 255`` truncated to an integer, grey = 0.3333 * (R + G + B), rounded).
* ``patch_entropy``: Shannon entropy (log2) of the 256-bin histogram of each row of grey levels.
* ``context_relevance``: for attention restricted to blocks (``block_id``: tokens attend only inside their
  block; CLIP tiles, Qwen windows / frames), grouped into *units* (``unit_id``: one tile or image)::

      A      = mean_h softmax_block(q_h k_h^T * scale)          (zero outside a block)
      recv_j = (1 / n_u) sum_q A[q, j]                            q, j in unit u, n_u tokens
      G_u    = {q in u : recv_q > theta_u}                        (empty: the token of largest recv)
      s_j    = (1 / |G_u|) sum_{q in G_u} A[q, j]

  with ``theta_u = t * mean_{j in u} recv_j``: the released rule (``received_attn = A.mean(0)``,
  ``received_attn > t * mean``, ``A[G, :].mean(0)``) applied per unit. With ``t_max`` set (ours, "bounded"):
  ``theta_u = min(t * mean_u recv, t_max * max_u recv)``, which equals the released threshold wherever some token
  reaches ``t * mean / t_max`` and never leaves G empty (``t_max < 1``). The released code has no rule for an
  empty G (its mean over no rows is NaN); ours takes the most attended token and reports how often
  (``empty``: no token of the unit passes the *released* threshold ``t * mean``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

GREY_WEIGHT = 0.3333  # the official code's equal channel weights (not exactly 1/3)


def grey_levels(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3, P] pixels in [0, 1] -> [..., P] long grey levels in 0..255."""
    levels = torch.clamp(pixels.float() * 255.0, 0.0, 255.0).trunc()  # the official uint8 cast truncates
    grey = (levels * GREY_WEIGHT).sum(dim=-2)
    return torch.round(grey).long().clamp_(0, 255)


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """[N, P] integer grey levels -> [N] float32 entropy in bits of each row's 256-bin histogram."""
    n, p = levels.shape
    hist = torch.zeros(n, 256, dtype=torch.float32, device=levels.device)
    hist.scatter_add_(1, levels.long(), torch.ones(n, p, dtype=torch.float32, device=levels.device))
    prob = hist / p
    return -(prob * torch.log2(prob + 1e-10)).sum(1)


def block_probs(q: torch.Tensor, k: torch.Tensor, scale: float, block_id: torch.Tensor) -> torch.Tensor:
    """[S, S] head-mean attention probabilities of one packed sequence (q, k: [H, S, D]), block-diagonal."""
    scores = torch.einsum("hqd,hkd->hqk", q.float(), k.float()) * scale
    same = block_id[:, None] == block_id[None, :]
    scores = scores.masked_fill(~same, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(0)


def global_selection(recv: torch.Tensor, unit_id: torch.Tensor, t: float, n_units: int | None = None,
                     t_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([S] bool: the global tokens of every unit, [n_units] bool: no token of the unit passes ``t * mean``).

    Global: recv above the unit's threshold (``t * mean``; with ``t_max``: ``min(t * mean, t_max * max)``), at
    least the argmax (the earliest on ties) where none passes. ``n_units`` (default: from ``unit_id``, a host
    sync) sizes the per-unit tables. No host sync otherwise (a captured prefill replays this)."""
    if n_units is None:
        n_units = int(unit_id.max()) + 1 if unit_id.numel() else 0
    dev = recv.device
    count = torch.zeros(n_units, device=dev).index_add_(0, unit_id, torch.ones_like(recv))
    mean = torch.zeros(n_units, device=dev).index_add_(0, unit_id, recv) / count
    best = torch.full((n_units,), float("-inf"), device=dev).scatter_reduce(0, unit_id, recv, "amax")
    released = recv > t * mean[unit_id]
    none_pass = ~torch.zeros(n_units, dtype=torch.bool, device=dev).index_put_((unit_id,), released, accumulate=True)
    theta = t * mean if t_max is None else torch.minimum(t * mean, t_max * best)
    glob = recv > theta[unit_id]
    has = torch.zeros(n_units, dtype=torch.bool, device=dev).index_put_((unit_id,), glob, accumulate=True)
    # a unit where no token passes falls back to its most attended token (vectorised: no host sync)
    idx = torch.arange(recv.numel(), device=dev)
    first = torch.full((n_units,), recv.numel(), device=dev).scatter_reduce(
        0, unit_id, torch.where(recv == best[unit_id], idx, recv.numel()), "amin")
    return glob | (~has[unit_id] & (first[unit_id] == idx)), none_pass


def global_rows(recv: torch.Tensor, unit_id: torch.Tensor, t: float, n_units: int | None = None,
                t_max: float | None = None) -> torch.Tensor:
    """[S] bool: the global tokens of every unit (see :func:`global_selection`)."""
    return global_selection(recv, unit_id, t, n_units, t_max)[0]


class Relevance(NamedTuple):
    """``context_relevance(..., details=True)``: the scores and what the global-token rule did per unit."""

    scores: torch.Tensor  # [S] context relevance
    empty: torch.Tensor  # [n_units] bool: no token passed the released threshold t * mean(recv)
    n_global: torch.Tensor  # [n_units] float: |G| of each unit as used (after the bound / the fallback)


def relevance_from(a_colsum: Callable[[torch.Tensor], torch.Tensor], unit_id: torch.Tensor, t: float,
                   n_units: int | None, t_max: float | None, details: bool) -> torch.Tensor | Relevance:
    """The two weighted column sums of the rule (``a_colsum(w)`` = sum_q w_q A[q, :]), shared by the reference
    and the Triton kernel: received attention, the global rows, then their mean attention."""
    if n_units is None:
        n_units = int(unit_id.max()) + 1
    dev = unit_id.device
    size = torch.zeros(n_units, device=dev).index_add_(0, unit_id, torch.ones(unit_id.numel(), device=dev))
    recv = a_colsum(1.0 / size[unit_id])
    glob, empty = global_selection(recv, unit_id, t, n_units, t_max)
    n_glob = torch.zeros(n_units, device=dev).index_add_(0, unit_id, glob.float())
    scores = a_colsum(glob.float() / n_glob[unit_id])
    return Relevance(scores, empty, n_glob) if details else scores


def context_relevance(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_id: torch.Tensor, unit_id: torch.Tensor, t: float,
    n_units: int | None = None, t_max: float | None = None, details: bool = False,
) -> torch.Tensor | Relevance:
    """[S] context relevance s_j (see the module docstring) of a packed sequence; q, k: [H, S, D].
    ``details``: a :class:`Relevance` (scores, per-unit empty flags, |G|) instead of the scores alone."""
    a = block_probs(q, k, scale, block_id)
    return relevance_from(lambda w: w @ a, unit_id.to(a.device), t, n_units, t_max, details)
