"""Time ZipVL's probe-scoring kernel (one LLaVA-1.5-7B layer: 32 heads x 128) against the layer's own attention.

    python benchmarks/probe_scores.py            # CUDA; prints a table, writes $OUT/probe_scores.json

Per sequence length N: 10% probe rows (half the most recent, half random), the Triton kernel with several tile
shapes, the FLOP floor of its two passes (2 x probes x visible keys x d x 2 per head, at the measured bf16
matmul rate), and the causal SDPA (FlashAttention) of the full layer at N, which the kernel rides beside.
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

from mmeff.kernels.probe_scores.triton import probe_scores

TILES = [None, (32, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 8, 3),
         (128, 64, 4, 3)]


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ a, return_mode="median") / 1e3)


def measure(n: int, rate: float, h: int = 32, d: int = 128) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    p = n // 10
    recent = torch.arange(n - p // 2, n, device="cuda")
    rand = torch.randperm(n - p // 2, device="cuda", generator=gen)[: p - p // 2]
    pos = torch.sort(torch.cat([rand, recent])).values[None]
    w = torch.ones(1, p, device="cuda")
    ok = torch.ones(1, n, dtype=torch.bool, device="cuda")
    pq = torch.gather(q, 2, pos[:, None, :, None].expand(1, h, p, d)).contiguous()
    visible = float((pos.float() + 1).sum())  # probe-key pairs per head
    floor_ms = 2 * 2 * visible * d * h / rate * 1e3
    sdpa_ms = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True), return_mode="median")
    ref = probe_scores(pq, k, pos, w, ok, d**-0.5)[0]
    row = {"tokens": n, "probes": p, "floor_ms": floor_ms, "sdpa_ms": sdpa_ms, "tiles": {}}
    for tile in TILES:
        try:
            acc = probe_scores(pq, k, pos, w, ok, d**-0.5, tile=tile)[0]
            err = ((acc - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(lambda t=tile: probe_scores(pq, k, pos, w, ok, d**-0.5, tile=t),
                                         return_mode="median")
        except Exception as e:  # a tile that does not fit the shared memory
            row["tiles"][str(tile)] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
            continue
        row["tiles"][str(tile)] = {"ms": ms, "rel_err_vs_default": err}
        print(f"N={n:6d} tile={tile!s:18} {ms:8.3f} ms  floor {floor_ms:.3f}  sdpa {sdpa_ms:.3f}  err {err:.1e}",
              flush=True)
    return row


def main() -> None:
    rate = matmul_rate()
    print(f"bf16 matmul {rate / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}")
    rows = [measure(n, rate) for n in (4096, 16384, 65536)]
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "probe_scores.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "matmul_tflops": rate / 1e12, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
