"""Triton kernels of VFlowOpt's importance map (CUDA only; imported lazily by the dispatcher).

* ``patch_entropy``: one program per row; the 256-bin histogram is built with ``tl.histogram`` tile by tile.
  Lanes past the row end load level 0, so their count is subtracted from bin 0 afterwards.
* ``context_relevance``: two flash-style passes over the block-diagonal attention of a packed sequence, never
  holding an [S, S] matrix: (1) per query row and head, the log-sum-exp over its block's keys; (2) per key
  tile and head, the row-weighted column sums of exp(s - lse). Pass (2) runs twice: with weights 1/n_unit
  (received attention) and with the global-row indicator / |G| (context relevance). The global-token
  threshold between them is a few small torch ops (``reference.relevance_from``, shared with the reference).
Scores accumulate in float32; float32 inputs use IEEE dot products (no TF32), so the result matches the
torch reference to ~1e-5 relative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmeff.kernels.vflowopt_score.reference import Relevance, relevance_from


@triton.jit
def _entropy_kernel(levels_ptr, out_ptr, P, stride_row, n_pad, inv_p, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    hist = tl.zeros([256], dtype=tl.int32)
    base = levels_ptr + row.to(tl.int64) * stride_row
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < P, other=0).to(tl.int32)
        hist += tl.histogram(x, 256)
    bins = tl.arange(0, 256)
    hist = hist - tl.where(bins == 0, n_pad, 0)
    prob = hist.to(tl.float32) * inv_p
    ent = -tl.sum(prob * tl.log2(prob + 1e-10), axis=0)
    tl.store(out_ptr + row, ent)


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """[N, P] integer grey levels (0..255) -> [N] float32 entropy in bits."""
    levels = levels.to(torch.int32).contiguous()
    n, p = levels.shape
    out = torch.empty(n, dtype=torch.float32, device=levels.device)
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(p))
    n_pad = triton.cdiv(p, block) * block - p
    _entropy_kernel[(n,)](levels, out, p, levels.stride(0), n_pad, 1.0 / p, BLOCK=block)
    return out


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _lse_kernel(q_ptr, k_ptr, bid_ptr, lo_ptr, hi_ptr, lse_ptr, S, D, scale,
                sqh, sqs, skh, sks, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    h = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    rmask = rows < S
    q = tl.load(q_ptr + h * sqh + rows[:, None] * sqs + dims[None, :], mask=rmask[:, None] & (dims[None, :] < D),
                other=0.0)
    bid_q = tl.load(bid_ptr + rows, mask=rmask, other=-1)
    lo = tl.min(tl.load(lo_ptr + rows, mask=rmask, other=S), axis=0)
    hi = tl.max(tl.load(hi_ptr + rows, mask=rmask, other=0), axis=0)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        cmask = cols < hi
        kt = tl.load(k_ptr + h * skh + cols[None, :] * sks + dims[:, None],
                     mask=cmask[None, :] & (dims[:, None] < D), other=0.0)
        bid_k = tl.load(bid_ptr + cols, mask=cmask, other=-2)
        s = _dot(q, kt, IEEE) * scale
        s = tl.where(bid_q[:, None] == bid_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + h * S + rows, m_i + tl.log(l_i), mask=rmask)


@triton.jit
def _colsum_kernel(q_ptr, k_ptr, bid_ptr, lo_ptr, hi_ptr, lse_ptr, w_ptr, out_ptr, S, D, scale,
                   sqh, sqs, skh, sks, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    h = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    cmask = cols < S
    kt = tl.load(k_ptr + h * skh + cols[None, :] * sks + dims[:, None], mask=cmask[None, :] & (dims[:, None] < D),
                 other=0.0)
    bid_k = tl.load(bid_ptr + cols, mask=cmask, other=-2)
    lo = tl.min(tl.load(lo_ptr + cols, mask=cmask, other=S), axis=0)
    hi = tl.max(tl.load(hi_ptr + cols, mask=cmask, other=0), axis=0)
    acc = tl.zeros([BN], dtype=tl.float32)
    for start in range(lo, hi, BM):
        rows = start + tl.arange(0, BM)
        rmask = rows < hi
        q = tl.load(q_ptr + h * sqh + rows[:, None] * sqs + dims[None, :],
                    mask=rmask[:, None] & (dims[None, :] < D), other=0.0)
        bid_q = tl.load(bid_ptr + rows, mask=rmask, other=-1)
        lse = tl.load(lse_ptr + h * S + rows, mask=rmask, other=0.0)
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        s = _dot(q, kt, IEEE) * scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(bid_q[:, None] == bid_k[None, :], p, 0.0)
        acc += tl.sum(p * w[:, None], axis=0)
    tl.store(out_ptr + h * S + cols, acc, mask=cmask)


def _block_bounds(block_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the [start, end) of its block; blocks must be contiguous runs of equal ids. Computed by running
    max / min over the run boundaries: no count is read back (a captured prefill may not), and the contiguity
    check, which must read one, is skipped while a CUDA graph is being captured."""
    s = block_id.numel()
    idx = torch.arange(s, device=block_id.device)
    first = torch.ones(s, dtype=torch.bool, device=block_id.device)
    first[1:] = block_id[1:] != block_id[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    starts = torch.where(first, idx, 0).cummax(0).values
    ends = torch.where(last, idx + 1, s).flip(0).cummin(0).values.flip(0)
    if not torch.cuda.is_current_stream_capturing() and int(first.sum()) != torch.unique(block_id).numel():
        raise ValueError("vflowopt_score: block_id must label contiguous runs of tokens (one run per block)")
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def _launch_colsum(args: tuple, w: torch.Tensor, h: int, s: int, meta: dict) -> torch.Tensor:
    out = torch.empty(h, s, dtype=torch.float32, device=w.device)
    q, k, bid, lo, hi, lse, d, scale = args
    grid = (h, triton.cdiv(s, meta["BN"]))
    _colsum_kernel[grid](q, k, bid, lo, hi, lse, w.float().contiguous(), out, s, d, scale,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), **meta)
    return out.mean(0)


def context_relevance(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_id: torch.Tensor, unit_id: torch.Tensor, t: float,
    n_units: int | None = None, t_max: float | None = None, details: bool = False,
) -> torch.Tensor | Relevance:
    """[S] context relevance of a packed sequence (q, k: [H, S, D]); the same numbers as the reference
    (``details``: a :class:`~mmeff.kernels.vflowopt_score.reference.Relevance`)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        q, k = q.float(), k.float()
    q, k = q.contiguous(), k.to(q.dtype).contiguous()
    h, s, d = q.shape
    bid = block_id.to(torch.int32).contiguous()
    lo, hi = _block_bounds(block_id)
    meta = {"IEEE": q.dtype == torch.float32, "BM": 64, "BN": 64, "BD": max(16, triton.next_power_of_2(d))}
    lse = torch.empty(h, s, dtype=torch.float32, device=q.device)
    _lse_kernel[(h, triton.cdiv(s, meta["BM"]))](q, k, bid, lo, hi, lse, s, d, float(scale),
                                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), **meta)
    args = (q, k, bid, lo, hi, lse, d, float(scale))
    return relevance_from(lambda w: _launch_colsum(args, w, h, s, meta), unit_id.long(), t, n_units, t_max, details)
