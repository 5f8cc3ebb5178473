"""PNG plots of an evaluation: each headline metric against the visual tokens kept, one point per preset, with
the 95% paired-bootstrap interval of each preset's change against ``none`` drawn as a bar around its point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmeff.io import atomic_path

from .tasks import POPE_TASKS

Point = tuple[str, float, float, tuple[float, float] | None]  # preset, tokens kept, value, (low, high) or None


def _series(results: dict[str, Any]) -> dict[str, tuple[list[Point], bool]]:
    """Panel title -> ([(preset, visual tokens kept, value, interval)], is a percentage)."""
    out: dict[str, tuple[list[Point], bool]] = {}
    base = results["runs"][0]["tasks"]
    for run in results["runs"]:
        for task, m in run["tasks"].items():
            x = m["cost"]["visual_tokens_kept"]
            if task in POPE_TASKS:
                panels = {f"{task} F1 (%)": ("f1", 100.0), f"{task} accuracy (%)": ("accuracy", 100.0)}
            elif task == "chair":
                panels = {"CHAIR_S (%, lower is better)": ("chair_s", 100.0), "CHAIR_I (%)": ("chair_i", 100.0)}
            else:
                panels = {"MME perception": ("perception", 1.0)}
            for title, (key, scale) in panels.items():
                if m.get(key) is None:  # an MME total over an incomplete group of subtasks: not plotted
                    continue
                delta = run.get("delta", {}).get(task, {}).get(key)
                ci = None if delta is None else (scale * (base[task][key] + delta["lo"]),
                                                 scale * (base[task][key] + delta["hi"]))
                points, _ = out.setdefault(title, ([], scale == 100.0))
                points.append((run["preset"], x, scale * m[key], ci))
    return out


def plot_accuracy_vs_tokens(results: dict[str, Any], path: str | Path) -> Path:
    """Write the plot atomically (temp file + rename) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(results)
    n = max(len(series), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, (points, percent)) in zip(axes.flat, series.items()):
        for preset, x, y, ci in points:
            if ci is None:
                ax.scatter([x], [y], s=30, marker="s", color="black", zorder=3)
            else:
                lo, hi = ci
                ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="o", ms=5, capsize=3)
            ax.annotate(preset, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8, annotation_clip=False)
        ax.margins(x=0.2, y=0.15)  # room for the labels of the points at the edges
        if percent:
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, 0.0), min(high, 100.0))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("visual tokens kept (mean over layers, per sample)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"{results['model']}: accuracy vs visual tokens kept (bars: 95% paired-bootstrap interval of the "
                 "change against none)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # never clip a label at the figure's edge
    plt.close(fig)
    return path
