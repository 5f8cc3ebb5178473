"""Plain-torch reference for attention statistics.

``received_attention`` returns, per key j, the attention it receives averaged over heads and over a weighted
set of query rows i::

    r[b, j] = sum_i w[b, i] * mean_h softmax_j(s[b, h, i, :])[j] / sum_i w[b, i],
    s[b, h, i, j] = scaling * <q[b, h, i], k[b, h // g, j]> + mask[b, i, j]

computed in query chunks (float32 accumulation), so peak memory is O(chunk x keys x heads), not O(q x k x heads).
"""

from __future__ import annotations

import torch


def _additive(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[B|1, 1|H, q, k] float32 additive mask; None means causal aligned to the last key (SDPA's is_causal)."""
    if mask is None:
        q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos
        return torch.where(allowed, 0.0, float("-inf"))[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf"))
    return mask.float()


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Full softmax attention [B, H, q, k] in float32 (rows with every key masked give zeros, not NaN)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    scores = scores + _additive(mask, query.shape[2], key.shape[2], query.device)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    query_weights: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """[B, k] attention each key receives, averaged over heads and the weighted query rows (see module doc).

    ``query`` [B, H, q, d], ``key`` [B, Hkv, k, d] (GQA: H a multiple of Hkv), ``mask`` 4-D bool/additive or
    None (causal), ``query_weights`` [B, q] (default: all rows weigh 1).
    """
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    weights = query.new_ones(b, q_len, dtype=torch.float32) if query_weights is None else query_weights.float()
    total = torch.zeros(b, k_len, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        if mask is None:
            m = _additive(None, q_len, k_len, query.device)[..., start:stop, :]
        else:
            m = mask[..., start:stop, :]
        probs = attention_probs(query[:, :, start:stop], key, m, scaling)  # [B, H, c, k]
        total += torch.einsum("bhik,bi->bk", probs, weights[:, start:stop]) / h
    return total / weights.sum(1, keepdim=True).clamp_min(1e-12)
