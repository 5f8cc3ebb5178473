"""Where does a preset's prefill time go? torch.profiler on one prefill of a full-size random-weight model.

    python benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,vflowopt-90 --batch-size 16 \
        --output out/profile

``--decode N`` profiles N decode steps after the (unprofiled) prefill instead.

For each preset: the prefill wall time (CUDA events), the summed GPU kernel time (the gap is host overhead:
launches and synchronisations), and the top operators by self CPU time and by GPU time, written to
``OUTPUT/<model>_b<batch>_<preset>.txt``, with the self CPU time attributed to the innermost mmeff frame on
each operator's Python stack. Random weights: timing only.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mmeff
from mmeff.engine.cache import cache_kwarg, find_cache
from mmeff_lab.evaluation import speed


def prefill(model: torch.nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)


class Decode:
    """N greedy decode steps after a prefill: ``prepare`` prefills (not profiled), ``decode`` times the steps."""

    def __init__(self, model: torch.nn.Module, inputs: dict, steps: int) -> None:
        self.model, self.inputs, self.steps = model, inputs, steps

    def prepare(self) -> None:
        with torch.no_grad():
            out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        self.cache, self.token = find_cache(out), out.logits[:, -1:].argmax(-1)
        self.mask = self.inputs.get("attention_mask")
        self.name = cache_kwarg(self.model.forward)

    def decode(self) -> float:
        """Wall ms of the steps (synchronised before and after)."""
        sync = torch.cuda.synchronize if self.token.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(self.steps):
                if self.mask is not None:
                    self.mask = torch.cat([self.mask, torch.ones_like(self.token)], 1)
                out = self.model(input_ids=self.token, attention_mask=self.mask, use_cache=True,
                                 **{self.name: self.cache})
                self.token = out.logits[:, -1:].argmax(-1)
        sync()
        return (time.perf_counter() - start) * 1e3


def by_mmeff_function(prof: profile) -> list[tuple[str, float]]:
    """CPU time (ms) under each mmeff function: inclusive time of the profiler's Python-function events (the
    tracer records them as events), or, where operators carry stacks, their self time by innermost mmeff frame."""
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        frames = [f for f in (evt.stack or []) if "/mmeff/" in f]
        if frames:
            totals[frames[0].split("/mmeff/")[-1]] += evt.self_cpu_time_total / 1e3
        elif "/mmeff/" in evt.name:
            totals["(incl.) " + evt.name.split("/mmeff/")[-1]] += evt.cpu_time_total / 1e3
    return sorted(totals.items(), key=lambda kv: -kv[1])[:40]


def sync_points(model: torch.nn.Module, inputs: dict) -> list[tuple[int, str]]:
    """Host synchronisations of one prefill (CUDA sync-debug mode), counted by the innermost two project
    frames (mmeff or transformers) of the Python stack that triggered them."""
    import traceback
    import warnings

    counts: dict[str, int] = defaultdict(int)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "/mmeff/" in f.filename or "transformers" in f.filename]
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1].split('/mmeff/')[-1]}:{f.lineno} {f.name}"
                            for f in frames[::-1][:2])
        counts[where or f"{filename}:{lineno}"] += 1

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                prefill(model, inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    return sorted(((n, w) for w, n in counts.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--preset", default="none,vflowopt-90")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=1, help="images per prompt (28 on llava-1.5-7b: 16k tokens)")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--output", type=Path, default=Path("out/profile"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode", type=int, default=0, help="profile this many decode steps instead of the prefill")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model in speed.architectures():
        net = speed.build_random(args.model, args.device, dtype)
    else:  # a local or shipped model (e.g. reference-llava): handy to try the script on CPU
        from mmeff_lab.models.loading import load_model

        net = load_model(args.model, device=args.device, dtype=dtype)[0]
    inputs = speed.synth_inputs(net, args.batch_size, args.images)
    timer = speed._Timer(torch.device(args.device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for name in args.preset.split(","):
        with mmeff.wrap(net, name):
            if args.decode:
                run = Decode(net, inputs, args.decode)
                walls = []
                for _ in range(3):
                    run.prepare()
                    walls.append(run.decode())
                wall = min(walls[1:])
                run.prepare()
                with profile(activities=activities, with_stack=True) as prof:
                    run.decode()
            else:
                for _ in range(2):
                    prefill(net, inputs)
                wall = min(timer(lambda: prefill(net, inputs))[0] for _ in range(3))
                with profile(activities=activities, with_stack=True) as prof:
                    prefill(net, inputs)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
        events = prof.key_averages()
        # kernel events only: an operator's self device time repeats its kernels' time (counted twice before)
        gpu_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events
                     if str(getattr(e, "device_type", "")).endswith("CUDA"))
        what = f"{args.decode} decode steps" if args.decode else "prefill"
        head = (f"{args.model} batch {args.batch_size} preset {name}: {what} {wall:.1f} ms (best), "
                f"GPU kernels {gpu_us / 1e3:.1f} ms, host-bound gap {wall - gpu_us / 1e3:.1f} ms\n")
        print(head, flush=True)
        text = [head]
        for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
            try:
                text.append(f"-- sorted by {key}\n" + events.table(sort_by=key, row_limit=args.rows))
            except (AttributeError, KeyError, ValueError):
                continue
        text.append("-- self CPU ms under mmeff functions\n" + "\n".join(f"{ms:9.2f}  {fn}" for fn, ms in
                                                                        by_mmeff_function(prof)))
        if args.device == "cuda" and not args.decode:
            with mmeff.wrap(net, name):
                syncs = sync_points(net, inputs)
            total = sum(n for n, _ in syncs)
            print(f"  {total} host synchronisations; top: {syncs[:4]}", flush=True)
            sites = "\n".join(f"{n:5d}  {w}" for n, w in syncs)
            text.append(f"-- {total} host synchronisations, by call site\n{sites}")
        stem = f"{args.model}_b{args.batch_size}_i{args.images}_{Path(name).stem}" + ("_decode" if args.decode else "")
        (args.output / f"{stem}.txt").write_text("\n".join(text))


if __name__ == "__main__":
    main()
