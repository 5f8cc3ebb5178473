"""Write the ablation variants of a VFlowOpt preset file: ``<stem>-noentropy.toml`` (alpha_v = 0) and
``<stem>-norecycle.toml`` (recycle = false).

    python experiments/vflowopt_ablations.py out/vflowopt/tuned/vflowopt-90-tuned.toml out/vflowopt/tuned
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmeff.presets import get_preset, write_preset


def main(src: str, out_dir: str) -> None:
    preset = get_preset(src)
    cfg = preset.config()
    stem = Path(src).stem
    for suffix, change, what in (("noentropy", {"alpha_v": 0.0}, "patch entropy off"),
                                 ("norecycle", {"recycle": False}, "recycling off")):
        name = f"{stem}-{suffix}"
        path = write_preset(Path(out_dir) / f"{name}.toml", name, cfg.replace(**change), f"{stem}, {what}")
        print(f"wrote {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="the VFlowOpt preset file to ablate")
    ap.add_argument("out_dir", help="folder for the two variants")
    a = ap.parse_args()
    main(a.preset, a.out_dir)
