"""Train a reference VLM on procedural scenes (GPU machine; resumable across 10-minute commands).

    python experiments/train_reference.py --prepare --images 40000 --workers 16      # render once (out/data)
    python experiments/train_reference.py --arch llava --minutes 6 --total-minutes 6  # train, save out/llava/model
    python experiments/train_reference.py --arch llava --minutes 9 --total-minutes 15 --resume  # continue

The schedule (warm-up + cosine) runs over --total-minutes of training time, split over any number of
commands; each command stops before its --minutes wall budget, writes a checkpoint and the fp16 model.
"""

from __future__ import annotations

import argparse
import json

from mmeff_lab.reference.model import ARCHS
from mmeff_lab.reference.scenes import DEFAULT_GLYPHS
from mmeff_lab.reference.training import TrainConfig, prepare_data, train
from mmeff_lab.reference.vocab import GLYPH_STYLES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="render the training scenes and exit")
    ap.add_argument("--images", type=int, default=40000, help="training scenes to render (--prepare)")
    ap.add_argument("--draws", type=int, default=2, help="question sets drawn per scene (--prepare)")
    ap.add_argument("--workers", type=int, default=16, help="rendering processes (--prepare)")
    ap.add_argument("--p-halluc", type=float, default=0.15,
                    help="share of detailed captions naming an absent co-occurring object (--prepare)")
    ap.add_argument("--balanced-sides", action="store_true",
                    help="yes/no side questions true half of the time (--prepare)")
    ap.add_argument("--inline-halluc", action="store_true",
                    help="word hallucinated caption mentions like drawn objects (--prepare)")
    ap.add_argument("--glyphs", default=DEFAULT_GLYPHS, choices=sorted(GLYPH_STYLES),
                    help="glyph style of the scenes (--prepare)")
    ap.add_argument("--data", default="out/data", help="rendered data folder")
    ap.add_argument("--arch", choices=ARCHS)
    ap.add_argument("--out", help="output folder (default out/<arch>)")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall budget of this command")
    ap.add_argument("--total-minutes", type=float, default=8.0, help="training time of the whole schedule")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--init-from", default="", help="start from this saved model folder (fresh optimiser)")
    ap.add_argument("--init-skip", default="", help="regex of --init-from parameters to re-initialise")
    ap.add_argument("--text-config", default="",
                    help='decoder size overrides as JSON, e.g. \'{"num_hidden_layers": 12}\'')
    ap.add_argument("--aux-weight", type=float, default=0.0, help="weight of the auxiliary per-token category loss")
    ap.add_argument("--aux-minutes", type=float, default=0.0, help="train with it for this long (0: always)")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare_data(args.data, args.images, draws=args.draws, workers=args.workers, p_halluc=args.p_halluc,
                     balanced_sides=args.balanced_sides, inline_halluc=args.inline_halluc, glyphs=args.glyphs)
        print(f"data ready in {args.data}")
        return
    if args.arch is None:
        ap.error("--arch is required unless --prepare")
    cfg = TrainConfig(arch=args.arch, data_dir=args.data, out_dir=args.out or f"out/{args.arch}",
                      minutes=args.minutes, total_minutes=args.total_minutes, batch_size=args.batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, device=args.device,
                      init_from=args.init_from, init_skip=args.init_skip,
                      text_overrides=json.loads(args.text_config) if args.text_config else {},
                      aux_weight=args.aux_weight, aux_minutes=args.aux_minutes)
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
