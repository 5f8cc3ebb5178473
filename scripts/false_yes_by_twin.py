"""False "yes" answers on POPE negatives, split by whether the asked object's twin (the category that shares its glyph
but for the accent mark, `vocab._twin_specs`) is in the image: how much of the adversarial gap is look-alikes.

    python scripts/false_yes_by_twin.py BENCH_DIR SAMPLES_DIR   # SAMPLES_DIR = <mmeff eval --output>/samples/<preset>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmeff.evaluation.pope import load_questions
from mmeff.reference.scenes import make_scene
from mmeff.reference.vocab import GROUP_OF, GROUPS


def twin(category: str) -> str | None:
    cats = GROUPS[GROUP_OF[category]]
    j = cats.index(category) ^ 1  # pairs (0, 1), (2, 3), ...
    return cats[j] if j < len(cats) else None


def main(bench: str, samples: str) -> None:
    manifest = json.loads((Path(bench) / "manifest.json").read_text())
    glyphs = manifest["params"]["glyphs"]
    for split in ("random", "popular", "adversarial"):
        answers = {}
        for line in (Path(samples) / f"pope_{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            answers[str(row["id"])] = row["answer"].strip().lower().startswith("yes")
        counts = {True: [0, 0], False: [0, 0]}  # twin present -> [false yes, negatives]
        for q in load_questions(Path(bench) / "pope" / f"coco_pope_{split}.json"):
            if q.label != "no" or str(q.question_id) not in answers:
                continue
            obj = q.text[len("Is there "):-len(" in the image?")].split(" ", 1)[1]
            scene = make_scene(int(Path(q.image).stem.split("_")[-1]), glyphs)
            present = twin(obj) in scene.categories
            counts[present][0] += answers[str(q.question_id)]
            counts[present][1] += 1
        fy = sum(c[0] for c in counts.values())
        print(f"{split:12s} false yes {fy}/{sum(c[1] for c in counts.values())}: twin in image "
              f"{counts[True][0]}/{counts[True][1]}, twin absent {counts[False][0]}/{counts[False][1]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
