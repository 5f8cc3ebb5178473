"""Plain-torch reference of decode attention over one quantized cache segment (what CPUs use).

A *part* is one precision class of a ZipVL cache block: ``M`` tokens whose keys (per channel) and values (per
token) are quantized (:mod:`mmeff.kernels.kv_quant`), and ``index`` [B, M], each token's column in the
block (``length`` marks a padding token). For one decode query row ``q`` [B, Hq, D] and an additive bias over
the block's columns (the layer's mask; None: every column visible)::

    s_j   = scaling * q . k_hat_j + bias[index_j]        (index_j == length: s_j = -inf)
    lse   = log sum_j exp(s_j)
    out   = sum_j exp(s_j - lse) v_hat_j

``(out, lse)`` of every segment of a layer merge exactly into the attention over all of them
(:func:`finish`), so no segment is ever materialised next to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmeff.kernels.kv_quant import QuantizedTensor


@dataclass
class Segment:
    """One quantized part of a cache block as decode attention reads it: ``bias`` [B, length] is the block's
    slice of the layer's additive mask row (None: every column visible)."""

    keys: QuantizedTensor
    values: QuantizedTensor
    index: torch.Tensor  # [B, M] int32 column of each token in the block; ``length``: padding
    length: int
    bias: torch.Tensor | None


def segment_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """[B, Hq, T] float32 scores of one query row [B, Hq, D] against keys [B, Hkv, T, D] (GQA: Hq = g*Hkv)."""
    b, hq, d = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)
    return torch.einsum("bhgd,bhtd->bhgt", q, keys.float()).reshape(b, hq, -1) * scaling


def segment_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, 1, D], lse [B, Hq, 1]) float32 of one query row over full-precision keys/values
    [B, Hkv, T, D]; ``bias`` [B, T] additive (``-inf`` hides a column)."""
    b, hq, d = query.shape
    hkv = keys.shape[1]
    s = segment_scores(query, keys, scaling)
    if bias is not None:
        s = s + bias[:, None, :]
    lse = torch.logsumexp(s, -1)  # -inf where every column is hidden
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgt,bhtd->bhgd", p.view(b, hkv, hq // hkv, -1), values.float()).reshape(b, hq, d)
    return out[:, :, None], lse[:, :, None]


def part_bias(index: torch.Tensor, length: int, bias: torch.Tensor | None) -> torch.Tensor:
    """[B, M] additive bias of a part's tokens: the block's bias at their columns, -inf for padding tokens."""
    valid = index < length
    safe = torch.where(valid, index, 0).long()
    got = torch.zeros(index.shape, device=index.device) if bias is None else torch.gather(bias.float(), 1, safe)
    return got.masked_fill(~valid, float("-inf"))


def part_attention(query: torch.Tensor, part: Segment, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, 1, D], lse [B, Hq, 1]) float32: dequantize the part, then :func:`segment_attention`."""
    bias = part_bias(part.index, part.length, part.bias)
    return segment_attention(query, part.keys.dequantize(), part.values.dequantize(), bias, scaling)


def finish(
    outs: list[torch.Tensor], lses: list[torch.Tensor], scores: torch.Tensor, v_buf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the parts' partials (out [B, Hq, S_i, D], lse [B, Hq, S_i]) with the full-precision buffer (its
    scores [B, Hq, NB], bias included, and values [B, Hkv, NB, D]): each buffer token is a partial whose lse
    is its score and whose output is its value. (out [B, Hq, D], the buffer's probabilities [B, Hq, NB])."""
    b, hq, nb = scores.shape
    hkv, d = v_buf.shape[1], v_buf.shape[-1]
    lse = torch.cat([*lses, scores], -1)
    total = torch.logsumexp(lse, -1, keepdim=True)  # finite: the newest token always sees itself
    w = torch.exp(lse - total)
    n = lse.shape[-1] - nb
    out = torch.einsum("bhgt,bhtd->bhgd", w[..., n:].view(b, hkv, hq // hkv, nb), v_buf.float()).reshape(b, hq, d)
    if n:
        out = out + (w[..., :n, None] * torch.cat(outs, 2)).sum(2)
    return out, w[..., n:]


def decode_attention(
    query: torch.Tensor,
    parts: list[Segment],
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    bias_buf: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's attention over quantized parts plus a full-precision buffer: (out [B, Hq, D] in the
    query's dtype, the buffer tokens' probabilities [B, Hq, NB] float32)."""
    partials = [part_attention(query, p, scaling) for p in parts]
    scores = segment_scores(query, k_buf, scaling)
    if bias_buf is not None:
        scores = scores + bias_buf[:, None]
    out, probs = finish([o for o, _ in partials], [lse for _, lse in partials], scores, v_buf)
    return out.to(query.dtype), probs
