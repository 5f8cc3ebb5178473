"""Teacher-forced batches: what the head trainers of DyVTE and the explainability method learn from.

An :class:`Example` is (image, question, answer); :func:`make_batch` chat-formats the questions with the model's
processor, appends each answer and EOS, and marks the rows whose next-token logits predict an answer token.
Where the examples come from (reference scenes, a JSON-lines file) is the caller's business (the lab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmeff.families.prompt import make_inputs

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str


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
