"""Shared slow references for the tests: greedy decoding that recomputes the whole forward from scratch at
every step (no KV cache), exactly as ``generate`` feeds the unwrapped model (positions from the padding mask
for LLaVA families; Qwen's token types extended with text for generated tokens)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mmeff.families import adapter_for
from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import random_image


@torch.no_grad()
def greedy_recompute(
    model, inputs, steps: int, handles: Iterable[RemovableHandle] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sequences, per-step last logits) of greedy decoding by full recomputation, as ``generate`` with
    ``min_new_tokens=steps``; removes ``handles`` after."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    # every caller compares with generate(min_new_tokens=steps): end-of-sequence tokens are never chosen (the raw
    # logits, as output_logits returns them, are kept)
    eos_id = model.generation_config.eos_token_id
    eos = None if eos_id is None else torch.tensor(eos_id, device=ids.device).view(-1)
    llava = not adapter_for(model).mrope  # LLaVA families (OneVision's Qwen2 decoder included): 1-D positions
    logits = []
    try:
        for _ in range(steps):
            kw = dict(extra)
            if llava:
                kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)  # what generate passes
            last = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits[:, -1]
            logits.append(last)
            nxt = (last if eos is None else last.index_fill(-1, eos, float("-inf"))).argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            if "mm_token_type_ids" in extra:  # Qwen: generated tokens are text
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    finally:
        for h in handles:
            h.remove()
    return ids, logits


def assert_same_generation(got: Any, want: Any, atol: float = 1e-4) -> None:
    """Two ``generate`` outputs (``output_logits``, ``return_dict_in_generate``): the same tokens, logits within
    ``atol``."""
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=atol, atol=atol)


def method_data(handle: Any, index: int = 0) -> Any:
    """The per-generation ``Data`` of the handle's ``index``-th method in its current state."""
    return handle.pipeline.methods[index].data(handle.pipeline.state)


SIZES = [(48, 40), (40, 64), (64, 32)]


def batch(processor, family: str, multi_image: bool = True):
    """Two left-padded samples of different lengths; the second has two images of different sizes."""
    second = [random_image(2, SIZES[1]), random_image(3, SIZES[2])] if multi_image else [random_image(2, SIZES[1])]
    return make_inputs(
        processor,
        ["describe the picture", "what color is the large shape on the left of these two images"],
        [[random_image(1, SIZES[0])], second],
    )


def visual_mask(model, inputs) -> torch.Tensor:
    visual = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, sample in enumerate(adapter_for(model).spans(inputs["input_ids"], inputs)):
        for sp in sample:
            visual[b, sp.start : sp.end] = True
    return visual


def masked_keys_generate(model, inputs, drop_for, steps: int) -> tuple[torch.Tensor, list]:
    """Greedy decoding, full recompute per step; decoder layer ``l`` hides the prompt positions ``drop_for(l)``
    ([B, N] bool, or None for none) as keys — a hidden token still sees itself, so no attention row is empty."""
    handles = []

    def hide_from(layer: int):
        dropped = drop_for(layer)

        def hide(module, args, kwargs):
            m = kwargs["attention_mask"]
            n = m.shape[-1]
            drop = torch.zeros(m.shape[0], n, dtype=torch.bool)
            drop[:, : dropped.shape[1]] = dropped
            m = m.masked_fill(drop[:, None, None, :], torch.finfo(m.dtype).min)
            eye = torch.eye(n, dtype=torch.bool)[None, None] & drop[:, None, None, :]
            kwargs["attention_mask"] = m.masked_fill(eye, 0.0)
            return args, kwargs

        return hide if dropped is not None else None

    for i, layer in enumerate(adapter_for(model).layers):
        if (hook := hide_from(i)) is not None:
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return greedy_recompute(model, inputs, steps, handles)


def hidden_tokens_generate(model, inputs, dropped: torch.Tensor, k: int, steps: int) -> tuple[torch.Tensor, list]:
    """``dropped`` [B, N] prompt positions hidden (as keys) from decoder layer ``k`` on (FastV's plan)."""
    return masked_keys_generate(model, inputs, lambda layer: dropped if layer >= k else None, steps)


def visible_from_geometry(q_pos, k_pos, k_valid):
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]


def dense_relevance(a: torch.Tensor, t: float) -> torch.Tensor:
    recv = a.mean(0)
    g = (recv > t * recv.mean()).nonzero().flatten()
    if g.numel() == 0:
        g = recv.argmax()[None]
    return a[g].mean(0)


def onevision_nested_batch(processor):
    """LLaVA-OneVision inputs with nested images (the processor's multi-image layout: base tiles + one trailing
    newline each) beside a one-image sample, left padded: 1 and 2 images."""
    prompts = [processor.apply_chat_template([{"role": "user", "content": [*[{"type": "image"}] * n,
                                                                           {"type": "text", "text": t}]}],
                                             add_generation_prompt=True, tokenize=False)
               for n, t in ((1, "describe the picture"), (2, "compare these two images"))]
    images = [[random_image(1, SIZES[0])], [random_image(2, SIZES[1]), random_image(3, SIZES[2])]]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [1, 2]
    return inputs


def cuda_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Mean CUDA-event milliseconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
