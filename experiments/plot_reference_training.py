"""Plot reference-model training curves (language loss, auxiliary vision loss) from train_log.jsonl files.

    python experiments/plot_reference_training.py docs/img/reference_training.png \
        llava=docs/results/reference_llava_train_log.jsonl qwen2vl=docs/results/reference_qwen2vl_train_log.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(out: str, *runs: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        name, path = run.split("=", 1)
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in recs]
        line, = ax.plot(steps, [r["loss"] for r in recs], label=f"{name}: total loss")
        aux = [(r["step"], r["aux_loss"]) for r in recs if r.get("aux_loss")]
        if aux:
            ax.plot(*zip(*aux), linestyle="--", color=line.get_color(), label=f"{name}: auxiliary vision loss")
    ax.set_xlabel("step (batch 128)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("png", help="the plot to write")
    ap.add_argument("runs", nargs="+", help="NAME=train_log.jsonl, one per curve")
    a = ap.parse_args()
    main(a.png, *a.runs)
