"""False "yes" answers on POPE negatives, split by whether the asked object's twin (the category that shares its glyph
but for the accent mark, `vocab.twin_of`) is in the image: how much of the adversarial gap is look-alikes.

    python experiments/false_yes_by_twin.py BENCH_DIR SAMPLES_DIR

SAMPLES_DIR = <mmeff eval --output>/samples/<preset> (run with --log-samples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmeff_lab.evaluation.pope import load_questions
from mmeff_lab.evaluation.runner import read_log
from mmeff_lab.reference.scenes import make_scene
from mmeff_lab.reference.synthetic import MANIFEST, image_seed, pope_object
from mmeff_lab.reference.vocab import twin_of


def main(bench: str, samples: str) -> None:
    manifest = json.loads((Path(bench) / MANIFEST).read_text())
    glyphs = manifest["params"]["glyphs"]
    for split in ("random", "popular", "adversarial"):
        log = Path(samples) / f"pope_{split}.jsonl"
        answers = {i: r["answer"].strip().lower().startswith("yes") for i, r in read_log(log).items()}
        if not answers:
            raise SystemExit(f"{log}: no sample log (run mmeff eval with --log-samples)")
        counts = {True: [0, 0], False: [0, 0]}  # twin present -> [false yes, negatives]
        for q in load_questions(Path(bench) / "pope" / f"coco_pope_{split}.json"):
            if q.label != "no" or str(q.question_id) not in answers:
                continue
            scene = make_scene(image_seed(q.image), glyphs)
            present = twin_of(pope_object(q.text)) in scene.categories
            counts[present][0] += answers[str(q.question_id)]
            counts[present][1] += 1
        fy = sum(c[0] for c in counts.values())
        print(f"{split:12s} false yes {fy}/{sum(c[1] for c in counts.values())}: twin in image "
              f"{counts[True][0]}/{counts[True][1]}, twin absent {counts[False][0]}/{counts[False][1]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", help="the benchmark folder the samples were answered on (with its manifest)")
    ap.add_argument("samples", help="<mmeff eval --output>/samples/<preset>")
    a = ap.parse_args()
    main(a.bench, a.samples)
