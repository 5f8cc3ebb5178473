"""How early could a perfect router let the visual tokens go? (DyVTE feasibility, per model)

A command line over ``mmeff_lab.evaluation.exits``. ``write`` writes the forced-exit presets ``exit-1 .. exit-(L-1)``
(FastV with ratio 1: every visual token dropped before layer k) and prints their paths comma-separated, for
``mmeff eval --preset none,...``. ``report`` reads one ``mmeff eval --log-samples`` output folder that ran ``none``
and those exits, and reports per task the share of answers each exit keeps equal to ``none``'s and the *oracle*
mean exit layer: per question, the earliest k whose answer equals the full model's (L when none does). DyVTE can at
best match the oracle, so an oracle mean above L/2 means the "visual tokens gone after at most half the layers"
target is out of reach on that model.

    python experiments/exit_oracle.py write DIR L          # DIR/exit-k.toml for k = 1..L-1
    python experiments/exit_oracle.py report OUTPUT L      # table + OUTPUT/exit_oracle.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmeff_lab.evaluation.exits import format_oracle_report, oracle_report, write_exit_presets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("write", "report"))
    ap.add_argument("folder", type=Path, help="write: folder for the presets; report: the mmeff eval output folder")
    ap.add_argument("layers", type=int, help="decoder layers L of the model")
    args = ap.parse_args(argv)
    if args.command == "write":
        print(",".join(str(p) for p in write_exit_presets(args.folder, args.layers)))
        return
    try:
        report = oracle_report(args.folder, args.layers)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    (args.folder / "exit_oracle.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_oracle_report(report))


if __name__ == "__main__":
    main()
