"""Where does a decode step's time go, eager vs CUDA graphs? One full-size random-weight model, batch B.

    python benchmarks/decode_step.py --model llava-1.5-7b --preset none,fastv-90 --batch-size 1 --steps 64

Per preset and decode mode: wall ms per step of ``model(...)`` calls fed back greedily (what ``generate`` runs,
without its own bookkeeping), and for graphs the GPU ms of one ``graph.replay()`` alone (CUDA events). The floor
is the bytes a step must read — decoder + LM-head weights and the KV cache — over the memory traffic rate of a
device-to-device copy (bytes read + written per second) measured in the same run. Random weights: timing only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import mmeff
from mmeff.engine.cache import cache_kwarg, cache_nbytes, find_cache
from mmeff.families import adapter_for
from mmeff_lab.evaluation import speed


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1e3)


@torch.no_grad()
def decode(model: torch.nn.Module, inputs: dict, steps: int) -> tuple[float, object]:
    """Median wall ms per step of ``steps`` greedy single-token forwards after a prefill (first step excluded:
    it captures the graph), and the prefill's output cache."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, token, mask = find_cache(out), out.logits[:, -1:].argmax(-1), inputs["attention_mask"]
    name = cache_kwarg(model.forward)
    walls = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    return statistics.median(walls[1:]), cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--preset", default="none,fastv-90")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda")
    net = speed.build_random(args.model, "cuda", torch.bfloat16)
    inputs = speed.synth_inputs(net, args.batch_size)
    lm = adapter_for(net).language_model
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    weights += net.get_output_embeddings().weight.numel() * 2
    bandwidth = copy_bandwidth(device)
    rows = []
    for preset in args.preset.split(","):
        for graphs in (False, True):
            with mmeff.wrap(net, preset, cuda_graphs=graphs) as handle:
                wall, cache = decode(net, inputs, args.steps)
                replay = None
                run = handle.pipeline.state.static_run
                if run is not None and run.graph is not None:  # replays rewrite the last step's slot: harmless
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(20):
                        run.graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    replay = start.elapsed_time(end) / 20
                kv = cache_nbytes(cache)
            floor = (weights + kv) / bandwidth * 1e3  # read once, at the copy's traffic rate (read + write)
            rows.append({"preset": preset, "cuda_graphs": graphs, "step_ms": wall, "replay_gpu_ms": replay,
                         "floor_ms": floor, "kv_bytes": kv})
            print(f"{preset:12s} graphs={graphs!s:5s} step {wall:6.2f} ms"
                  + (f"  replay (GPU) {replay:5.2f} ms" if replay else "") + f"  floor {floor:5.2f} ms", flush=True)
    result = {"model": args.model, "random_weights": True, "batch_size": args.batch_size,
              "device": torch.cuda.get_device_name(device), "copy_bandwidth_gb_s": bandwidth / 1e9,
              "weight_bytes": weights, "rows": rows}
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"decode_step_{args.model}_b{args.batch_size}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
