"""Retrain the explain relevance mapper of the reference models with each relevance target and answer source, and
report whether it beats the raw layer-0 attention it reads (held-out top-50% overlap with the target).

Per model and configuration (``TARGET:ANSWER``, e.g. ``per-token:teacher``) the same training examples (seeded
``--data synthetic`` stream) are collected (``mmeff.methods.explain.train.collect_pairs``), the mapper is fitted
as ``mmeff train explain`` fits it (``fit_mapper``, the same seed and held-out split), and the report holds:

* ``heldout_top50_overlap``: the mapper's top-50% cells vs the target's, mean over held-out tiles;
* ``attention_top50_overlap`` / ``attention_instr_top50_overlap``: the same for the raw layer-0 attention of the
  last prompt row (channel 0) / of the instruction rows' mean (channel 1), with no training;
* ``gain_vs_attention`` ± ``gain_vs_attention_se``: the paired per-tile difference mapper - channel 0;
* ``target_agreement``: top-50% overlap of this configuration's targets with the first configuration's on the
  same tiles (only where both use teacher-forced answers: the tiles are then the same inputs).

    python experiments/explain_targets.py --models reference-llava,reference-qwen2vl --samples 512 --steps 500 \
        --device cpu --json out/explain_targets.json
    # --install DIR: also write each model's per-token:teacher mapper as DIR/<model>/explain.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmeff.families import adapter_for
from mmeff.heads import save_head
from mmeff.methods.explain.train import ANSWERS, TARGETS, collect_pairs, fit_mapper, head_tensors, keep_overlap
from mmeff_lab.models.loading import load_model, resolve_device
from mmeff_lab.training.data import examples_from


def parse_configs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        target, _, answer = item.strip().partition(":")
        if target not in TARGETS or answer not in ANSWERS:
            raise SystemExit(f"--configs: {item!r} is not TARGET:ANSWER with TARGET in {list(TARGETS)} and ANSWER in "
                             f"{list(ANSWERS)}")
        out.append((target, answer))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="reference-llava,reference-qwen2vl")
    ap.add_argument("--configs", default="summed:teacher,per-token:teacher,per-token:greedy")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--install", type=Path, default=None, help="write the per-token:teacher mappers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    device = resolve_device(args.device)
    results: dict[str, dict[str, dict]] = {}
    for spec in args.models.split(","):
        model, processor, family = load_model(spec, device=device)
        results[spec] = {}
        first_targets = None
        for target, answer in configs:
            t0 = time.time()
            torch.manual_seed(args.seed)
            pairs = collect_pairs(model, processor, examples_from(args.data, args.seed), args.samples,
                                  args.batch_size, target=target, answer=answer, max_new_tokens=args.max_new_tokens)
            collect_s = time.time() - t0
            mapper, report = fit_mapper(pairs, steps=args.steps, seed=args.seed)
            report.update(samples=args.samples, steps=args.steps, collect_s=round(collect_s, 1),
                          fit_s=round(time.time() - t0 - collect_s, 1))
            if answer == "teacher":
                if first_targets is None:
                    first_targets = [y for _, y in pairs]
                else:
                    agree = [keep_overlap(y, y0) for (_, y), y0 in zip(pairs, first_targets)]
                    report["target_agreement"] = sum(agree) / len(agree)
            name = f"{target}:{answer}"
            results[spec][name] = report
            if args.json is not None:  # after every configuration: a run cut short keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                out = {"command": " ".join(sys.argv), "device": device, "results": results}
                args.json.write_text(json.dumps(out, indent=1) + "\n")
            r = report
            print(f"{spec} {name}: mapper {r['heldout_top50_overlap']:.3f} | layer-0 attention "
                  f"{r['attention_top50_overlap']:.3f} (instruction rows {r['attention_instr_top50_overlap']:.3f})"
                  f" | gain {report['gain_vs_attention']:+.3f} +- {report['gain_vs_attention_se'] or 0:.3f} "
                  f"| {report['tiles_heldout']} held-out tiles | {collect_s:.0f}+{report['fit_s']:.0f} s",
                  flush=True)
            if args.install is not None and (target, answer) == ("per-token", "teacher"):
                a = adapter_for(model)
                meta = {"kind": "explain", "family": family, "model": spec,
                        "hidden_size": int(a.text_config.hidden_size), "num_layers": len(a.layers),
                        "width": mapper.width, "depth": mapper.depth, "data": args.data,
                        "settings": {"samples": args.samples, "steps": args.steps, "batch_size": args.batch_size,
                                     "seed": args.seed, "target": target, "answer": answer},
                        "report": report}
                path = save_head(args.install / spec / "explain.safetensors", head_tensors(mapper), meta)
                print(f"wrote {path}")
    if args.json is not None:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
