"""Where a preset's prefill time goes: torch.profiler over one prefill of a full-size random-weight architecture.

    python benchmarks/profile_prefill.py --model llava-1.5-7b --preset vflowopt-90 --batch-size 16

Prints the top operators by CUDA and by CPU time, and the time spent under each mmeff function (Python stacks),
for the preset and for ``none``; writes a Chrome trace to ``$OUT/<preset>.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import mmeff
from mmeff.evaluation import speed


def by_mmeff_function(prof: profile) -> list[tuple[str, float]]:
    """Self CPU time (ms) of operators, attributed to the innermost mmeff frame on their Python stack."""
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        frames = [f for f in (evt.stack or []) if "/mmeff/" in f]
        if frames:
            totals[frames[0].split("/mmeff/")[-1]] += evt.self_cpu_time_total / 1e3
    return sorted(totals.items(), key=lambda kv: -kv[1])[:25]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llava-1.5-7b", choices=speed.architectures())
    ap.add_argument("--preset", default="vflowopt-90")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model = speed.build_random(args.model, "cuda", torch.bfloat16)
    inputs = speed.synth_inputs(model, args.batch_size, 1, speed.arch_spec(args.model).get("image", {}).get("size"))
    for preset in ("none", args.preset):
        with mmeff.wrap(model, preset), torch.no_grad():
            for _ in range(2):
                model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                model(**inputs, logits_to_keep=1)
                torch.cuda.synchronize()
        print(f"\n===== {preset} =====")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        for name, ms in by_mmeff_function(prof):
            print(f"{ms:9.2f} ms  {name}")
        if os.environ.get("OUT"):
            prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"{preset}.json"))


if __name__ == "__main__":
    main()
