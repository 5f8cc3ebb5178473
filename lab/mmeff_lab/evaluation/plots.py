"""PNG plots of an evaluation: each headline metric against the visual tokens kept, one point per preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmeff.io import atomic_path

from .tasks import POPE_TASKS


def _series(results: dict[str, Any]) -> dict[str, list[tuple[str, float, float]]]:
    """Panel title -> [(preset, visual tokens kept, value)]."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for run in results["runs"]:
        for task, m in run["tasks"].items():
            x = m["cost"]["visual_tokens_kept"]
            if task in POPE_TASKS:
                panels = {f"{task} F1 (%)": 100 * m["f1"], f"{task} accuracy (%)": 100 * m["accuracy"]}
            elif task == "chair":
                panels = {"CHAIR_S (%, lower is better)": 100 * m["chair_s"], "CHAIR_I (%)": 100 * m["chair_i"]}
            else:
                panels = {"MME perception": m["perception"]}
            for title, y in panels.items():
                out.setdefault(title, []).append((run["preset"], x, y))
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
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, points) in zip(axes.flat, series.items()):
        for preset, x, y in points:
            ax.scatter([x], [y], s=30)
            ax.annotate(preset, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("visual tokens kept (mean per sample)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"{results['model']}: accuracy vs visual tokens kept", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
