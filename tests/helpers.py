"""Shared slow references for the tests: greedy decoding that recomputes the whole forward from scratch at
every step (no KV cache), exactly as ``generate`` feeds the unwrapped model (positions from the padding mask
for LLaVA families; Qwen's token types extended with text for generated tokens)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mmeff.families import adapter_for


@torch.no_grad()
def greedy_recompute(
    model, inputs, steps: int, handles: Iterable[RemovableHandle] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sequences, per-step last logits) of greedy decoding by full recomputation; removes ``handles`` after."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    llava = adapter_for(model).family in ("llava", "llava_next")
    logits = []
    try:
        for _ in range(steps):
            kw = dict(extra)
            if llava:
                kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)  # what generate passes
            last = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits[:, -1]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            if "mm_token_type_ids" in extra:  # Qwen: generated tokens are text
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    finally:
        for h in handles:
            h.remove()
    return ids, logits


def method_data(handle: Any, index: int = 0) -> Any:
    """The per-generation ``Data`` of the handle's ``index``-th method in its current state."""
    return handle.pipeline.methods[index].data(handle.pipeline.state)
