"""Time the fused received-attention kernel against its torch reference and the physical floors.

    python benchmarks/attention_stats.py   # on a CUDA machine; prints a table, writes $OUT/attention_stats.json

Shapes: one LLaVA-1.5-7B layer at prefill (32 heads x 128, 626 tokens) at batch 1 and 16, and a LLaVA-NeXT-sized
sequence (2,976 tokens). The floor is max(FLOPs / matmul rate, bytes / bandwidth) with both ceilings measured here.
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

from mmeff.kernels.attention_stats.reference import received_attention as reference
from mmeff.kernels.attention_stats.triton import bytes_floor, flops, received_attention_triton


def ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s) measured on this device."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    rate = 2 * 8192**3 / (ms / 1e3)
    x = torch.empty(2**28, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: x.clone(), return_mode="median")
    bw = 2 * x.numel() * x.element_size() / (ms / 1e3)
    return rate, bw


def measure(b: int, n: int, rate: float, bw: float, h: int = 32, d: int = 128) -> dict[str, float]:
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(n, device="cuda").expand(b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
    w = torch.ones(b, n, device="cuda")
    mask = (pos[:, None, :] <= pos[:, :, None])[:, None]
    t_kernel = triton.testing.do_bench(
        lambda: received_attention_triton(q, k, pos, pos, valid, d**-0.5, w), return_mode="median"
    )
    t_ref = triton.testing.do_bench(lambda: reference(q, k, mask, d**-0.5, w), return_mode="median")
    want = reference(q.double(), k.double(), mask, d**-0.5, w.double()).float()
    got = received_attention_triton(q, k, pos, pos, valid, d**-0.5, w)
    err = float((got - want).norm() / want.norm())
    floor = max(flops(q, k) / rate, bytes_floor(q, k) / bw) * 1e3
    return {"batch": b, "tokens": n, "kernel_ms": t_kernel, "torch_reference_ms": t_ref, "floor_ms": floor,
            "rel_err_bf16": err}


def main() -> None:
    rate, bw = ceilings()
    rows = [measure(b, n, rate, bw) for b, n in [(1, 626), (16, 626), (1, 2976)]]
    print(f"ceilings: matmul {rate / 1e12:.0f} TFLOP/s, copy {bw / 1e9:.0f} GB/s")
    print("| batch | tokens | kernel ms | torch ref ms | floor ms | kernel/floor | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tokens']} | {r['kernel_ms']:.3f} | {r['torch_reference_ms']:.3f} | "
              f"{r['floor_ms']:.3f} | {r['kernel_ms'] / r['floor_ms']:.1f}x | {r['rel_err_bf16']:.1e} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention_stats.json"), "w") as f:
            json.dump({"matmul_flops": rate, "copy_bytes_per_s": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
