"""How early could a perfect router let the visual tokens go? (issue 7 feasibility, per model)

Reads one ``mmeff eval`` output folder that ran ``none`` and forced exits ``exit-1 .. exit-(L-1)`` (FastV with
ratio 1: every visual token dropped before layer k, see ``write_exit_presets``) and reports, per task, the share
of answers each exit keeps equal to ``none`` and the *oracle* mean exit layer: per question, the earliest k whose
answer equals the full model's (L when none does). DyVTE can at best match the oracle, so an oracle mean above
L/2 means the "visual tokens gone after at most half the layers" target is out of reach on that model.

    python scripts/exit_oracle.py write DIR L          # DIR/exit-k.toml for k = 1..L-1
    python scripts/exit_oracle.py report OUTPUT L      # table + OUTPUT/exit_oracle.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmeff_lab.evaluation.runner import read_log


def write_exit_presets(folder: Path, layers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(1, layers):
        p = folder / f"exit-{k}.toml"
        p.write_text(f'[exit-{k}]\ndescription = "every visual token dropped before decoder layer {k}"\n'
                     f'method = "fastv"\nk = {k}\nratio = 1.0\nquery = "all"\n')
        paths.append(p)
    return paths


def report(output: Path, layers: int) -> dict[str, object]:
    out: dict[str, object] = {"layers": layers, "tasks": {}}
    base_dir = output / "samples" / "none"
    if not any(base_dir.glob("*.jsonl")):
        raise SystemExit(f"{base_dir}: no per-sample logs (run mmeff eval with --log-samples and a `none` row)")
    for log in sorted(base_dir.glob("*.jsonl")):
        task = log.stem
        base = {k: r["answer"].lower() for k, r in read_log(log).items()}
        same = {}
        for k in range(1, layers):  # sample folders are named after the preset path, '/' -> '_'
            folder = next(iter(sorted((output / "samples").glob(f"*exit-{k}.toml"))), None)
            recs = read_log(folder / log.name) if folder else {}
            same[k] = {q: recs[q]["answer"].lower() == a for q, a in base.items() if q in recs}
        if any(len(v) != len(base) for v in same.values()):
            continue  # an exit that did not run this task
        oracle = [next((k for k in range(1, layers) if same[k][q]), layers) for q in base]
        out["tasks"][task] = {
            "questions": len(base),
            "agree_by_exit": {k: sum(v.values()) / len(v) for k, v in same.items()},
            "oracle_mean_exit": sum(oracle) / len(oracle),
            "oracle_mean_exit_share": sum(oracle) / len(oracle) / layers}
    (output / "exit_oracle.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"L = {layers}; answers equal to none's, per exit layer k; oracle mean exit layer")
    for task, t in out["tasks"].items():
        agree = " ".join(f"{k}:{v:.2f}" for k, v in t["agree_by_exit"].items())
        print(f"{task:18s} n={t['questions']:4d}  {agree}  oracle {t['oracle_mean_exit']:.2f} "
              f"({t['oracle_mean_exit_share']:.0%} of layers)")
    return out


if __name__ == "__main__":
    cmd, folder, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if cmd == "write":
        print(",".join(str(p) for p in write_exit_presets(folder, n)))
    else:
        report(folder, n)
