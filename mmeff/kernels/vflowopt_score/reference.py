"""Torch reference of VFlowOpt's importance map: patch information entropy and attention context relevance.

Both ops work on a *packed* sequence, as the vision towers run it:

* ``grey_levels``: pixels (already un-normalised to [0, 1]) -> integer grey levels 0..255, the way the official
  code makes them (each channel ``x * 255`` truncated to an integer, grey = 0.3333 * (R + G + B), rounded).
* ``patch_entropy``: Shannon entropy (log2) of the 256-bin histogram of each row of grey levels.
* ``context_relevance``: for attention restricted to blocks (``block_id``: tokens attend only inside their
  block; CLIP tiles, Qwen windows / frames), grouped into *units* (``unit_id``: one tile or image)::

      A      = mean_h softmax_block(q_h k_h^T * scale)          (zero outside a block)
      recv_j = (1 / n_u) sum_q A[q, j]                            q, j in unit u, n_u tokens
      G_u    = {q in u : recv_q > t * mean_{j in u} recv_j}       (empty: the token of largest recv)
      s_j    = (1 / |G_u|) sum_{q in G_u} A[q, j]

  This is the official rule (``received_attn = A.mean(0)``, ``A[G, :].mean(0)``) applied per unit.
"""

from __future__ import annotations

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


def global_rows(recv: torch.Tensor, unit_id: torch.Tensor, t: float, n_units: int | None = None) -> torch.Tensor:
    """[S] bool: the global tokens of every unit (recv above t times the unit mean; at least the argmax, the
    earliest on ties). ``n_units`` (default: from ``unit_id``, a host sync) sizes the per-unit tables."""
    if n_units is None:
        n_units = int(unit_id.max()) + 1 if unit_id.numel() else 0
    count = torch.zeros(n_units, device=recv.device).index_add_(0, unit_id, torch.ones_like(recv))
    mean = torch.zeros(n_units, device=recv.device).index_add_(0, unit_id, recv) / count
    glob = recv > t * mean[unit_id]
    has = torch.zeros(n_units, dtype=torch.bool, device=recv.device).index_put_((unit_id,), glob, accumulate=True)
    # a unit where no token passes falls back to its most attended token (vectorised: no host sync)
    idx = torch.arange(recv.numel(), device=recv.device)
    best = torch.full((n_units,), float("-inf"), device=recv.device).scatter_reduce(0, unit_id, recv, "amax")
    first = torch.full((n_units,), recv.numel(), device=recv.device).scatter_reduce(
        0, unit_id, torch.where(recv == best[unit_id], idx, recv.numel()), "amin")
    return glob | (~has[unit_id] & (first[unit_id] == idx))


def context_relevance(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_id: torch.Tensor, unit_id: torch.Tensor, t: float,
    n_units: int | None = None,
) -> torch.Tensor:
    """[S] context relevance s_j (see the module docstring) of a packed sequence; q, k: [H, S, D]."""
    a = block_probs(q, k, scale, block_id)
    if n_units is None:
        n_units = int(unit_id.max()) + 1
    size = torch.zeros(n_units, device=a.device).index_add_(0, unit_id, torch.ones(a.shape[0], device=a.device))
    recv = a.sum(0) / size[unit_id]
    glob = global_rows(recv, unit_id, t, n_units).float()
    n_glob = torch.zeros(n_units, device=a.device).index_add_(0, unit_id, glob)
    return (glob @ a) / n_glob[unit_id]
