"""Teacher-forced batches: what the head trainers of DyVTE and the explainability method learn from.

An :class:`Example` is (image, question, answer); :func:`make_batch` chat-formats the questions with the model's
processor, appends each answer and EOS, and marks the rows whose next-token logits predict an answer token.
:func:`greedy_batch` does the same with the model's own greedy answer in place of the example's (the answer
the model actually gives, for targets that should explain the model's output rather than a reference text).
Where the examples come from (reference scenes, a JSON-lines file) is the caller's business (the lab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmeff.errors import MmeffError
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
               dtype: torch.dtype | None = None, answer_ids: list[list[int]] | None = None) -> Batch:
    """Teacher-forced batch of ``examples``; ``answer_ids`` (token ids per sample, used as given: no EOS added)
    replaces the examples' answer texts."""
    prompt = make_inputs(processor, [e.question for e in examples], [[e.image] for e in examples])
    tok = processor.tokenizer
    if answer_ids is not None:
        if len(answer_ids) != len(examples) or not all(answer_ids):
            raise MmeffError(f"make_batch: need one non-empty answer per example, got {len(answer_ids)} answers "
                             f"(lengths {[len(a) for a in answer_ids]}) for {len(examples)} examples")
        answers = [list(a) for a in answer_ids]
    else:
        prompt_text = tok.batch_decode(prompt["input_ids"][:, -1:])
        answers = []
        for e, end in zip(examples, prompt_text):
            text = e.answer if end.endswith((" ", "\n")) else " " + e.answer
            answers.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return _assemble(prompt, answers, tok.pad_token_id, device, dtype)


@torch.no_grad()
def greedy_answer_ids(model: Any, processor: Any, examples: list[Example], max_new_tokens: int) -> list[list[int]]:
    """Per example, the model's greedy answer to its question: tokens up to and including the first EOS (or
    ``max_new_tokens`` tokens if none comes)."""
    if max_new_tokens < 1:
        raise MmeffError(f"greedy answers: max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    prompt = _to(dict(make_inputs(processor, [e.question for e in examples], [[e.image] for e in examples])),
                 device, next(model.parameters()).dtype)
    # generation stops at any of the model's end tokens (a chat model may have several); the answer keeps it
    ends = model.generation_config.eos_token_id
    ends = {processor.tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])} - {None}
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    answers = []
    for row in out[:, prompt["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        answers.append(row[:cut])
    return answers


def greedy_batch(model: Any, processor: Any, examples: list[Example], max_new_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Batch:
    """A teacher-forced batch whose answers are the model's own greedy answers (:func:`greedy_answer_ids`)."""
    return make_batch(processor, examples, device, dtype, greedy_answer_ids(model, processor, examples, max_new_tokens))


def _assemble(prompt: Any, answers: list[list[int]], pad_id: int, device: torch.device | str,
              dtype: torch.dtype | None) -> Batch:
    b, n = prompt["input_ids"].shape
    m = max(len(a) for a in answers)
    ans = torch.full((b, m), pad_id, dtype=torch.long)
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
