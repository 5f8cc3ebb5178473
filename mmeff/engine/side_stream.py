"""A second sequence decoded in lock-step with the main one by the unwrapped model (PAI's no-image prompt, VCD's
noised image), with its own KV cache. Methods get one from their host (``Host.side_stream``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mmeff.engine.cache import cache_kwarg, find_cache
from mmeff.families.base import Adapter, text_positions


class SideStream:
    """``begin`` runs the stream's prefill; ``step`` feeds the tokens the main sequence just consumed. Both return
    the last position's logits [B, V] (float32). The model's per-sequence rotary state (Qwen's ``rope_deltas``,
    which every prefill overwrites) is kept per stream and restored after every call, so neither stream disturbs
    the other's positions. ``ms`` accumulates the stream's wall time."""

    def __init__(self, model: nn.Module, adapter: Adapter, unwrapped: Callable[[], AbstractContextManager[None]],
                 inputs: dict[str, Any]) -> None:
        self.model, self.adapter, self.unwrapped = model, adapter, unwrapped
        self.inputs = inputs
        self.mask: torch.Tensor = inputs["attention_mask"]
        self.cache: Any = None
        self.rope: Any = None
        self.ms = 0.0

    def _call(self, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        saved = self.adapter.rope_state()
        self.adapter.set_rope_state(self.rope)
        try:
            with self.unwrapped(), torch.no_grad():
                out = self.model(**kwargs, use_cache=True, return_dict=True)
            self.rope = self.adapter.rope_state()
        finally:
            self.adapter.set_rope_state(saved)
        self.cache = find_cache(out)
        self.ms += (time.perf_counter() - t0) * 1e3
        return out.logits[:, -1].float()

    def begin(self) -> torch.Tensor:
        kw = dict(self.inputs)
        positions = self.adapter.prefill_position_ids(kw, self.mask)
        if positions is not None:
            kw["position_ids"] = positions
        return self._call(**kw)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(tokens, dtype=self.mask.dtype)], 1)
        pos = self.adapter.text_position_ids(text_positions(self.mask)[:, -tokens.shape[1]:], self.rope)
        return self._call(input_ids=tokens, attention_mask=self.mask, position_ids=pos,
                          **{cache_kwarg(self.model.forward): self.cache})
