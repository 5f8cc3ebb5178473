"""Write the ablation variants of a VFlowOpt preset file: ``<stem>-noentropy.toml`` (alpha_v = 0) and
``<stem>-norecycle.toml`` (recycle = false).

    python scripts/ablate_preset.py out/tables/vflowopt-90-tuned.toml out/tables
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    main(*sys.argv[1:3])
