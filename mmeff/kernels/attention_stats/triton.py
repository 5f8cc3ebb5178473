"""Triton kernel: attention received per key, in two passes over Q·Kᵀ tiles, never holding the matrix.

Pass 1 computes each query row's log-sum-exp over the keys it may see (flash-attention style running max/sum);
pass 2 walks each key block over the query blocks that can see it and accumulates
``sum_i w_i · exp(s_ij − lse_i)``. Visibility is "causal by original position, key valid":
``k_pos[j] <= q_pos[i] and k_valid[j]`` — what every mask mmeff's pipeline builds reduces to (left padding and
fill slots are invalid keys; their rows carry zero weight). Positions are sorted per row, so each program
bounds its loop to the blocks that can contribute (host-side ``searchsorted``).
Both passes run in the log2 domain (``exp2``) with float32 accumulation; float32 inputs use IEEE dots.
Output: [B, k] — mean over heads of the weighted sum, divided by the total query weight (the reference's
definition, ``reference.received_attention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _lse_kernel(
    Q, K, QP, KP, KV, LSE, KLIM, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    H, GROUPS, QLEN, KLEN, NQB,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hk = (bh % H) // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < QLEN
    q = tl.load(
        Q + b * sqb + (bh % H) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    qp = tl.load(QP + b * QLEN + offs_m, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    klim = tl.load(KLIM + b * NQB + pid_m)
    for start in range(0, klim, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < KLEN
        k = tl.load(
            K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        kp = tl.load(KP + b * KLEN + offs_n, mask=col_ok, other=2147483647)
        kv = tl.load(KV + b * KLEN + offs_n, mask=col_ok, other=0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        allowed = (kp[None, :] <= qp[:, None]) & (kv[None, :] != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("inf"))
    tl.store(LSE + bh * QLEN + offs_m, lse, mask=row_ok)


@triton.jit
def _received_kernel(
    Q, K, QP, KP, KV, W, LSE, OUT, QSTART, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    H, GROUPS, QLEN, KLEN, NKB,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hk = (bh % H) // GROUPS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < KLEN
    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    kp = tl.load(KP + b * KLEN + offs_n, mask=col_ok, other=2147483647)
    kv = tl.load(KV + b * KLEN + offs_n, mask=col_ok, other=0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    qstart = tl.load(QSTART + b * NKB + pid_n)
    for start in range(qstart, QLEN, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < QLEN
        q = tl.load(
            Q + b * sqb + (bh % H) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        qp = tl.load(QP + b * QLEN + offs_m, mask=row_ok, other=-1)
        w = tl.load(W + b * QLEN + offs_m, mask=row_ok, other=0.0)
        lse = tl.load(LSE + bh * QLEN + offs_m, mask=row_ok, other=float("inf"))
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        allowed = (kp[None, :] <= qp[:, None]) & (kv[None, :] != 0)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        acc += tl.sum(p * w[:, None], 0)
    tl.store(OUT + bh * KLEN + offs_n, acc, mask=col_ok)


def received_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    scaling: float,
    query_weights: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """[B, k] attention received per key (see module doc). ``q_pos`` [B, q], ``k_pos`` [B, k]: sorted positions."""
    b, h, q_len, d = query.shape
    k_len, h_kv = key.shape[2], key.shape[1]
    dev = query.device
    qp = q_pos.to(device=dev, dtype=torch.int32).expand(b, q_len).contiguous()
    kp = k_pos.to(device=dev, dtype=torch.int32).expand(b, k_len).contiguous()
    kv = k_valid.to(device=dev, dtype=torch.int8).expand(b, k_len).contiguous()
    w = (torch.ones(b, q_len, device=dev) if query_weights is None else query_weights.float()).contiguous()
    nqb, nkb = triton.cdiv(q_len, block_m), triton.cdiv(k_len, block_n)
    # loop bounds: keys a query block can see / first query that can see a key block (positions are sorted)
    q_block_max = qp[:, torch.clamp(torch.arange(nqb, device=dev) * block_m + block_m - 1, max=q_len - 1)]
    klim = torch.searchsorted(kp, q_block_max.contiguous(), right=True).to(torch.int32).contiguous()
    k_block_min = kp[:, torch.arange(nkb, device=dev) * block_n]
    qstart = torch.searchsorted(qp, k_block_min.contiguous()).to(torch.int32).contiguous()
    lse = torch.empty(b * h, q_len, device=dev, dtype=torch.float32)
    out = torch.empty(b * h, k_len, device=dev, dtype=torch.float32)
    scale = scaling * LOG2E
    ieee = query.dtype == torch.float32
    block_d = max(16, 1 << (d - 1).bit_length())
    common = (*query.stride(), *key.stride(), h, h // h_kv)
    _lse_kernel[(nqb, b * h)](
        query, key, qp, kp, kv, lse, klim, scale, *common, q_len, k_len, nqb,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D=d, IEEE=ieee,
    )
    _received_kernel[(nkb, b * h)](
        query, key, qp, kp, kv, w, lse, out, qstart, scale, *common, q_len, k_len, nkb,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D=d, IEEE=ieee,
    )
    return out.view(b, h, k_len).mean(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def bytes_floor(query: torch.Tensor, key: torch.Tensor) -> int:
    """Fewest bytes the op must move: Q and K read once (pass 2 re-reads them; a fused single pass cannot)."""
    return query.numel() * query.element_size() + key.numel() * key.element_size()


def flops(query: torch.Tensor, key: torch.Tensor, causal: bool = True) -> float:
    """Multiply-adds of the two Q·Kᵀ passes, ×2 FLOPs each (half of the matrix under a causal mask)."""
    b, h, q, d = query.shape
    k = key.shape[2]
    frac = 0.5 if causal else 1.0
    return 2 * 2.0 * b * h * q * k * d * frac


__all__ = ["bytes_floor", "flops", "received_attention_triton"]
