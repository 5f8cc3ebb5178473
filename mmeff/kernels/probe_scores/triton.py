"""Triton kernel for :func:`mmeff.kernels.probe_scores.reference.probe_scores` (the accumulated part).

One program per (batch x head, block of probe rows), two passes over the key tiles the block can see:
pass 1 the row max and softmax denominator (online, as in FlashAttention), pass 2 recomputes the scores,
normalises them and adds ``w_i * p_ij / H`` summed over the block's rows into ``acc[b, j]`` (atomic add).
Scores live only in registers: nothing of size probes x keys is written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmeff.kernels.probe_scores.reference import probe_counts


@triton.jit
def _probe_kernel(
    q_ptr, k_ptr, pos_ptr, w_ptr, ok_ptr, acc_ptr,
    H, GROUPS, P, N, D, scale_log2,
    sqb, sqh, sqp, skb, skh, skn,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // GROUPS
    rows = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < P
    q = tl.load(
        q_ptr + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqp + dims[None, :],
        mask=row_ok[:, None] & (dims[None, :] < D), other=0.0,
    )
    qpos = tl.load(pos_ptr + b * P + rows, mask=row_ok, other=-1)
    w = tl.load(w_ptr + b * P + rows, mask=row_ok, other=0.0)
    last = tl.max(qpos, axis=0)  # keys beyond the block's last probe are invisible to all its rows
    k_base = k_ptr + b.to(tl.int64) * skb + kh * skh
    m_i = tl.full([BLOCK_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, last + 1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
        ok = tl.load(ok_ptr + b * N + cols, mask=col_ok, other=0) != 0
        if IEEE:  # float32 inputs: no TF32 rounding, so the result matches the reference to ~1e-6
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale_log2
        vis = ok[None, :] & col_ok[None, :] & (cols[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp2(m_i - m_safe))
        l_i = l_i * alpha + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    coef = tl.where(l_i > 0, w / tl.where(l_i > 0, l_i, 1.0), 0.0) / H
    for start in range(0, last + 1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
        ok = tl.load(ok_ptr + b * N + cols, mask=col_ok, other=0) != 0
        if IEEE:  # float32 inputs: no TF32 rounding, so the result matches the reference to ~1e-6
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale_log2
        vis = ok[None, :] & col_ok[None, :] & (cols[None, :] <= qpos[:, None])
        p = tl.where(vis, tl.exp2(s - m_safe[:, None]), 0.0) * coef[:, None]
        tl.atomic_add(acc_ptr + b * N + cols, tl.sum(p, axis=0), mask=col_ok)


def probe_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    probe_pos: torch.Tensor,
    probe_weight: torch.Tensor,
    key_ok: torch.Tensor,
    scaling: float,
    chunk: int = 128,
    tile: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tile`` = (probe rows, keys, warps, stages) per program, to override the default (benchmarks)."""
    b, h, p, d = query.shape
    n = key.shape[2]
    q = query.contiguous()
    k = key.contiguous().to(q.dtype)
    acc = torch.zeros(b, n, dtype=torch.float32, device=query.device)
    if p and n:
        block_d = max(16, triton.next_power_of_2(d))
        if tile is None:  # benchmarks/probe_scores.py on an H100: 128 probe rows per program read each key
            # tile once for 4x the rows of 32 (16k keys: 2.8 -> 1.9 ms per layer; 64k: 51 -> 23 ms)
            block_p = 16 if p <= 16 else 32 if p <= 256 or block_d > 128 else 128
            block_n = 64 if block_d <= 128 else 32
            warps, stages = 4, 3
        else:
            block_p, block_n, warps, stages = tile
        grid = (b * h, triton.cdiv(p, block_p))
        _probe_kernel[grid](
            q, k, probe_pos.contiguous().to(torch.int32), probe_weight.contiguous().float(),
            key_ok.contiguous().to(torch.int8), acc,
            h, h // key.shape[1], p, n, d, float(scaling) * 1.4426950408889634,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
            num_warps=warps, num_stages=stages,
        )
    return acc, probe_counts(probe_pos, probe_weight, key_ok)
