"""Tile sweep of ZipVL's fused decode kernels: one decode step's attention over a 7B layer (32 heads x 128)
holding TOKENS tokens, half at 4 bits and half at 2 bits, plus a 64-token buffer, by programs per SM and warps.

    python benchmarks/quant_decode_kernel.py --tokens 16384,65536
"""

from __future__ import annotations

import argparse
import itertools

import torch

from mmeff.kernels.kv_quant import quantize_kv
from mmeff.kernels.quant_attention import Segment
from mmeff.kernels.quant_attention import triton as qa


def part(tokens: int, bits: int, h: int = 32, d: int = 128) -> Segment:
    k = torch.randn(1, h, tokens, d, device="cuda", dtype=torch.float16)
    index = torch.randperm(tokens, device="cuda")[: tokens // 2].sort().values[None]
    return Segment(quantize_kv(k, bits, 32, "channel", index), quantize_kv(k, bits, 32, "token", index),
                   index.int(), tokens, None)


def timed(fn, *args, reps: int = 30, **kwargs) -> float:
    fn(*args, **kwargs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args, **kwargs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16384,65536")
    ap.add_argument("--programs", default="4,8,16,32,64")
    ap.add_argument("--warps", default="1,2,4,8")
    args = ap.parse_args()
    for tokens in map(int, args.tokens.split(",")):
        parts = [part(tokens, bits) for bits in (4, 2)]
        q = torch.randn(1, 32, 128, device="cuda", dtype=torch.float16)
        kb = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.float16)
        ref = qa.decode_attention(q, parts, kb, kb, None, 128**-0.5)[0].float()
        rows = []
        for pps, warps in itertools.product(map(int, args.programs.split(",")), map(int, args.warps.split(","))):
            out = qa.decode_attention(q, parts, kb, kb, None, 128**-0.5, programs_per_sm=pps, num_warps=warps)[0]
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = timed(qa.decode_attention, q, parts, kb, kb, None, 128**-0.5, programs_per_sm=pps, num_warps=warps)
            rows.append((ms, pps, warps, err))
        for ms, pps, warps, err in sorted(rows)[:8]:
            print(f"tokens {tokens}: {ms:.3f} ms  programs/SM {pps:3d}  warps {warps}  rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
