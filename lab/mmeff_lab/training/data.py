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
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmeff.errors import MmeffError
from mmeff_lab.models.factory import make_inputs
from mmeff_lab.reference.scenes import make_scene, render
from mmeff_lab.reference.synthetic import TRAIN_SEEDS
from mmeff_lab.reference.text import training_examples


class TrainingDataError(MmeffError):
    """A training data file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str


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


@dataclass
class Batch:
    """A teacher-forced batch: the prompt (left padded) followed by the answer and EOS (right padded).

    ``rows[b, i]`` marks the positions whose next-token logits predict an answer token, ``targets`` holds
    that token; ``prompt_len`` is the padded prompt length (the last prompt token is at ``prompt_len - 1``).
    """

    inputs: dict[str, Any]
    prompt: dict[str, Any]
    rows: torch.Tensor
    targets: torch.Tensor
    prompt_len: int


def make_batch(processor: Any, examples: list[Example], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Batch:
    prompt = make_inputs(processor, [e.question for e in examples], [[e.image] for e in examples])
    tok = processor.tokenizer
    prompt_text = tok.batch_decode(prompt["input_ids"][:, -1:])
    answers = []
    for e, end in zip(examples, prompt_text):
        text = e.answer if end.endswith((" ", "\n")) else " " + e.answer
        answers.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    b, n = prompt["input_ids"].shape
    m = max(len(a) for a in answers)
    ans = torch.full((b, m), tok.pad_token_id, dtype=torch.long)
    ans_mask = torch.zeros(b, m, dtype=torch.long)
    for i, a in enumerate(answers):
        ans[i, : len(a)] = torch.tensor(a)
        ans_mask[i, : len(a)] = 1
    inputs = dict(prompt)
    inputs["input_ids"] = torch.cat([prompt["input_ids"], ans], 1)
    inputs["attention_mask"] = torch.cat([prompt["attention_mask"], ans_mask], 1)
    for key, value in prompt.items():  # other per-token inputs (Qwen's mm_token_type_ids): answers are text
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape[:2] == (b, n):
            inputs[key] = torch.cat([value, value.new_zeros(b, m, *value.shape[2:])], 1)
    rows = torch.zeros(b, n + m, dtype=torch.bool)
    rows[:, n - 1 : n + m - 1] = ans_mask.bool()
    targets = torch.zeros(b, n + m, dtype=torch.long)
    targets[:, n - 1 : n + m - 1] = ans
    return Batch(_to(inputs, device, dtype), _to(dict(prompt), device, dtype), rows.to(device), targets.to(device), n)


def _to(inputs: dict[str, Any], device: torch.device | str, dtype: torch.dtype | None) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
