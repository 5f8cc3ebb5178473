"""Forced visual-token exits and the oracle exit layer: how early could a perfect DyVTE router let the image go?

A forced exit at layer k is FastV with ``k`` and ratio 1: every visual token is dropped before decoder layer k, for
every sample (``write_exit_presets``). Given one ``mmeff eval --log-samples`` output folder that ran ``none`` and
``exit-1 .. exit-(L-1)``, ``oracle_report`` gives per task the share of answers each exit keeps equal to ``none``'s
and the *oracle* mean exit layer: per question, the earliest k whose answer equals the full model's (L when none
does). A router can at best match the oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runner import read_log


def write_exit_presets(folder: Path, layers: int) -> list[Path]:
    """Write ``folder/exit-k.toml`` for k = 1 .. layers-1 and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(1, layers):
        p = folder / f"exit-{k}.toml"
        p.write_text(f'[exit-{k}]\ndescription = "every visual token dropped before decoder layer {k}"\n'
                     f'method = "fastv"\nk = {k}\nratio = 1.0\nquery = "all"\n')
        paths.append(p)
    return paths


def oracle_report(output: Path, layers: int) -> dict[str, Any]:
    """Per task of ``output`` (an ``mmeff eval`` folder with sample logs of ``none`` and every forced exit): the
    questions, the share of answers equal to ``none``'s per exit layer, and the oracle mean exit layer (also as a
    share of ``layers``). Tasks that some exit did not run are left out."""
    out: dict[str, Any] = {"layers": layers, "tasks": {}}
    base_dir = output / "samples" / "none"
    if not any(base_dir.glob("*.jsonl")):
        raise FileNotFoundError(f"{base_dir}: no per-sample logs (run mmeff eval with --log-samples and a `none` row)")
    for log in sorted(base_dir.glob("*.jsonl")):
        base = {k: r["answer"].lower() for k, r in read_log(log).items()}
        same = {}
        for k in range(1, layers):  # sample folders are named after the preset path, '/' -> '_'
            folder = next(iter(sorted((output / "samples").glob(f"*exit-{k}.toml"))), None)
            recs = read_log(folder / log.name) if folder else {}
            same[k] = {q: recs[q]["answer"].lower() == a for q, a in base.items() if q in recs}
        if any(len(v) != len(base) for v in same.values()):
            continue  # an exit that did not run this task
        oracle = [next((k for k in range(1, layers) if same[k][q]), layers) for q in base]
        out["tasks"][log.stem] = {
            "questions": len(base),
            "agree_by_exit": {k: sum(v.values()) / len(v) for k, v in same.items()},
            "oracle_mean_exit": sum(oracle) / len(oracle),
            "oracle_mean_exit_share": sum(oracle) / len(oracle) / layers}
    return out


def format_oracle_report(report: dict[str, Any]) -> str:
    """The report as text: one line per task."""
    lines = [f"L = {report['layers']}; answers equal to none's, per exit layer k; oracle mean exit layer"]
    for task, t in report["tasks"].items():
        agree = " ".join(f"{k}:{v:.2f}" for k, v in t["agree_by_exit"].items())
        lines.append(f"{task:18s} n={t['questions']:4d}  {agree}  oracle {t['oracle_mean_exit']:.2f} "
                     f"({t['oracle_mean_exit_share']:.0%} of layers)")
    return "\n".join(lines)
