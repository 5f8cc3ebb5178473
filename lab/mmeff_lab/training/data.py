"""Training examples (image, question, answer) and teacher-forced batches for the head trainers.

Sources: ``"synthetic"`` — the reference generator's training split (scenes from ``TRAIN_SEEDS``, questions
and answers from :func:`mmeff_lab.reference.text.training_examples`), or a JSON-lines file with one
``{"image": path, "question": str, "answer": str}`` object a line (image paths relative to the file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmeff.errors import MmeffError
from mmeff.methods._teacher import Example
from mmeff_lab.reference.scenes import make_scene, render
from mmeff_lab.reference.synthetic import TRAIN_SEEDS
from mmeff_lab.reference.text import training_examples


class TrainingDataError(MmeffError):
    """A training data file that cannot be read; the message names the file and line."""


def synthetic_examples(seed: int = 0, image_size: int = 224) -> Iterator[Example]:
    """Endless examples from training-split scenes (in a seeded random order), one question per scene."""
    rng = np.random.default_rng(seed)
    while True:
        scene_seed = int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop))
        scene = make_scene(scene_seed)
        pairs = training_examples(scene, rng)
        q, a = pairs[int(rng.integers(len(pairs)))]
        yield Example(render(scene, image_size), q, a)


def jsonl_examples(path: str | Path, seed: int = 0) -> Iterator[Example]:
    """Endless passes (each in a new seeded order) over a JSON-lines instruction file."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such training data file (expected JSON lines or 'synthetic')")
    records: list[tuple[Path, str, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, question, answer = rec["image"], rec["question"], rec["answer"]
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingDataError(f"{path}:{n}: need a JSON object with image, question, answer ({e})") from e
        img = (path.parent / image) if not Path(image).is_absolute() else Path(image)
        if not img.is_file():
            raise TrainingDataError(f"{path}:{n}: image {str(img)!r} does not exist")
        records.append((img, str(question), str(answer)))
    if not records:
        raise TrainingDataError(f"{path}: no examples")
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(records)).tolist():
            img, q, a = records[i]
            with Image.open(img) as im:
                yield Example(im.convert("RGB"), q, a)


def examples_from(data: str, seed: int = 0) -> Iterator[Example]:
    return synthetic_examples(seed) if data == "synthetic" else jsonl_examples(data, seed)


# -- tuning samples (prompts without answers) -------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    image: Image.Image
    text: str


def reference_samples(n: int, seed0: int = 0) -> list[Sample]:
    """``n`` training scenes of mmeff_lab.reference (seeds ``seed0..``, inside TRAIN_SEEDS) with a describe prompt."""
    if seed0 < TRAIN_SEEDS.start or seed0 + n > TRAIN_SEEDS.stop:
        raise TrainingDataError(f"tuning seeds [{seed0}, {seed0 + n}) must lie inside TRAIN_SEEDS {TRAIN_SEEDS}")
    return [Sample(render(make_scene(s)), "Describe this image in detail.") for s in range(seed0, seed0 + n)]


def load_tuning_jsonl(path: str | Path, n: int) -> list[Sample]:
    """The first ``n`` lines of a JSON-lines file of {"image": path (relative to the file), "text": prompt}."""
    path = Path(path)
    out: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                img_path = (path.parent / rec["image"]).resolve()
                out.append(Sample(Image.open(img_path).convert("RGB"), str(rec["text"])))
            except (json.JSONDecodeError, KeyError, OSError) as e:
                raise TrainingDataError(f"{path}:{lineno}: bad tuning record ({type(e).__name__}: {e})") from None
            if len(out) == n:
                break
    if not out:
        raise TrainingDataError(f"{path}: no tuning records")
    return out
