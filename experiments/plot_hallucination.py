"""CHAIR_S vs CHAIR recall per preset from an `mmeff eval` results.json (hallucination table plot).

    python experiments/plot_hallucination.py docs/results/halluc_reference_llava.json \\
        docs/img/halluc_reference_llava.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, out: str) -> None:
    runs = json.loads(Path(src).read_text())["runs"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in runs:
        chair = run["tasks"]["chair"]
        name = Path(run["preset"]).stem
        ax.scatter(100 * chair["recall"], 100 * chair["chair_s"])
        ax.annotate(name, (100 * chair["recall"], 100 * chair["chair_s"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("CHAIR recall (%)")
    ax.set_ylabel("CHAIR_S (%)  (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="an `mmeff eval` results.json with CHAIR")
    ap.add_argument("png", help="the plot to write")
    a = ap.parse_args()
    main(a.results, a.png)
