"""Paired bootstrap between two presets of one `mmeff eval` call, from their answers (docs/trained-pruners.md,
"Training settings"). ``answers_<model>.json``: {preset: {task: {sample id: answer}}}, taken from the call's
sample logs (DIR/samples/<preset>/<task>.jsonl, which `mmeff eval` deletes at the end without --log-samples).

    PYTHONPATH=$PWD:$PWD/lab python docs/results/issue26_gpu/dyvte_paper_heads/paired_dyvte.py \
        docs/results/issue26_gpu/dyvte_paper_heads/answers_llava.json dyvte paper --limit 200

Prints metric(OTHER) - metric(BASE) per task with the 95% percentile interval of 200 paired resamples, seed 0
(the eval's own rule: mmeff_lab.evaluation.results.deltas); with BASE = none it reproduces the eval's CIs.
"""
import argparse
import json
from pathlib import Path

from mmeff_lab.evaluation.bootstrap import paired_bootstrap
from mmeff_lab.evaluation.tasks import HEADLINE, load_samples, resolve_data, score

ap = argparse.ArgumentParser()
ap.add_argument("answers")
ap.add_argument("base")
ap.add_argument("other")
ap.add_argument("--limit", type=int, required=True)
ap.add_argument("--n-boot", type=int, default=200)
a = ap.parse_args()
answers = json.loads(Path(a.answers).read_text())
data = resolve_data("synthetic")
for task in answers[a.base]:
    samples = load_samples(task, data, a.limit)
    scored = {p: score(task, samples, [answers[p][task][s.id] for s in samples]) for p in (a.base, a.other)}
    for name, metric in HEADLINE[task].items():
        d, lo, hi = paired_bootstrap(scored[a.base].matrix, scored[a.other].matrix, metric, n_boot=a.n_boot, seed=0)
        k = 1 if name == "perception" else 100
        print(f"{task} {name}: {a.other} - {a.base} = {k * d:+.1f} [{k * lo:+.1f}, {k * hi:+.1f}]")
