"""Plain-torch reference of ZipVL's probe-query scores (ZipCache's normalized attention, approximated).

For probe queries ``i`` (a subset of the prompt rows, with weights ``w_i``) and keys ``j``::

    acc[b, j]   = sum_i w_i * mean_h softmax_j(scaling * <q[b,h,i], k[b,h//g,j]> | j visible to i)
    count[b, j] = sum_i w_i * [j visible to i]
    visible(i, j) = key_ok[b, j] and pos[b, j] <= probe_pos[b, i]      (causal over slot positions)

``acc / count`` is the normalized attention score: the mean attention a key receives from the probe queries
that can see it, which removes the lower-triangle bias of plain accumulation (early tokens are seen by more
queries). Computed in probe chunks: memory O(chunk x keys x heads), never keys x keys.
"""

from __future__ import annotations

import torch


def probe_counts(probe_pos: torch.Tensor, probe_weight: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """[B, N] float32: total weight of the probes that can see each key (no attention needed)."""
    n = key_ok.shape[1]
    w = probe_weight.float()
    per_pos = torch.zeros(key_ok.shape[0], n + 1, dtype=torch.float32, device=key_ok.device)
    per_pos.scatter_add_(1, probe_pos.clamp(0, n), w)  # weight of the probes sitting at each position
    seen = per_pos[:, :n].flip(1).cumsum(1).flip(1)  # probes at positions >= j
    return seen * key_ok.float()


def probe_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    probe_pos: torch.Tensor,
    probe_weight: torch.Tensor,
    key_ok: torch.Tensor,
    scaling: float,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc, count), both [B, N] float32 (see module doc).

    ``query`` [B, H, P, d]: the probe rows only; ``key`` [B, Hkv, N, d] (GQA: H a multiple of Hkv);
    ``probe_pos`` [B, P] long slot positions of the probes; ``probe_weight`` [B, P] (0 for padding probes);
    ``key_ok`` [B, N] bool (False: padding / fill slots, never attended).
    """
    b, h, p, _ = query.shape
    n = key.shape[2]
    groups = h // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    pos = torch.arange(n, device=key.device)
    acc = torch.zeros(b, n, dtype=torch.float32, device=key.device)
    w = probe_weight.float()
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        scores = torch.matmul(query[:, :, start:stop].float(), k.transpose(-1, -2)) * scaling  # [B, H, c, N]
        visible = key_ok[:, None, :] & (pos[None, None, :] <= probe_pos[:, start:stop, None])  # [B, c, N]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a probe that sees nothing contributes nothing
        acc += torch.einsum("bhcn,bc->bn", probs, w[:, start:stop]) / h
    return acc, probe_counts(probe_pos, probe_weight, key_ok)
