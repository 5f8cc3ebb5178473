"""Shared pieces of the hallucination methods (VAR, VHR, FIA, PAI, VCD).

* key coordinates: which keys of a decoder layer's attention call are visual / at which original position
  (keys = the layer's group slots, then the decoded tokens);
* the PAI-style logit boost ``a <- a + alpha * |a|`` on the last query row;
* :class:`SideStream`: a second sequence (the prompt without its image, or with a noised image) decoded in
  lock-step with the main one, with its own KV cache, through the unwrapped model
  (``Pipeline.suspended``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from mmeff.engine.cache import cache_kwarg, find_cache
from mmeff.engine.state import State
from mmeff.errors import ConfigError

if TYPE_CHECKING:
    from mmeff.engine.pipeline import Pipeline


def check_layers(name: str, start: int, end: int | None, n_layers: int) -> range:
    """The 0-based decoder layers ``[start, end)`` (``end`` None: all remaining layers), validated."""
    stop = n_layers if end is None else end
    if not 0 <= start < stop <= n_layers:
        raise ConfigError(f"{name}: layers [{start}, {end}) do not fit a {n_layers}-layer decoder")
    return range(start, stop)


def key_positions(state: State, layer: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, K] original position, [B, K] valid) of the keys a layer's attention sees at this step."""
    g = state.group_for(layer)
    index, valid = g.index, g.valid
    extra = k_len - index.shape[1]
    if extra > 0:  # decode: the decoded tokens follow the group's prompt slots
        new = torch.arange(state.n_prompt, state.n_prompt + extra, device=index.device).expand(index.shape[0], -1)
        index = torch.cat([index, new], 1)
        valid = torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], 1)
    elif extra < 0:
        raise RuntimeError(f"layer {layer}: {k_len} keys but the layer's group holds {index.shape[1]} prompt slots")
    return index, valid


def key_flags(state: State, layer: int, k_len: int, flags: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: ``flags`` ([B, n] over original positions, n >= n_prompt; later positions False) at the
    layer's keys; fill slots are False."""
    index, valid = key_positions(state, layer, k_len)
    n = flags.shape[1]
    padded = flags if n >= int(index.max()) + 1 else torch.cat(
        [flags, flags.new_zeros(flags.shape[0], int(index.max()) + 1 - n)], 1)
    return torch.gather(padded.to(index.device), 1, index) & valid


def boost_last_row(scores: torch.Tensor, keys: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """PAI's image-attention amplification on the last query row, pre-softmax: ``a <- a + alpha * |a|`` on the
    keys selected by ``keys`` ([B, K] or [B, H, K] bool); ``alpha`` a float or [B, H] per-head factors."""
    last = scores[:, :, -1, :]
    if keys.ndim == 2:
        keys = keys[:, None, :]
    a = alpha if isinstance(alpha, float) else alpha[..., None].to(last.dtype)
    new_last = torch.where(keys, last + a * last.abs(), last)
    out = scores.clone()
    out[:, :, -1, :] = new_last
    return out


def last_position_logits(logits: torch.Tensor, new_last: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, L, V] with its last position replaced (only it is sampled from)."""
    out = logits.clone()
    out[:, -1, :] = new_last.to(out.dtype)
    return out


def text_only_inputs(state: State, inputs: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """The prompt without its visual tokens (left padded again): PAI's / VHR's no-image input."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    keep = real & ~state.visual.to(ids.device)
    n = int(keep.sum(1).max())
    out_ids = torch.full((ids.shape[0], n), pad_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros(ids.shape[0], n, dtype=torch.long, device=ids.device)
    for b in range(ids.shape[0]):
        row = ids[b][keep[b]]
        if row.numel():
            out_ids[b, n - row.numel():] = row
            out_mask[b, n - row.numel():] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask}


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` builds them (padding at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class SideStream:
    """A second sequence decoded next to the main one, on the unwrapped model, with its own KV cache.

    ``begin`` runs its prefill; ``step`` feeds the tokens the main sequence just consumed. Qwen's M-RoPE
    offsets (``rope_deltas``, stored on the model by each prefill) are kept per stream and restored after
    every call, so neither stream disturbs the other's positions. ``ms`` accumulates the stream's wall time.
    """

    def __init__(self, pipeline: Pipeline, inputs: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.model = pipeline.model
        self.base = pipeline.adapter.base
        self.inputs = inputs
        self.mask: torch.Tensor = inputs["attention_mask"]
        self.cache: Any = None
        self.deltas: torch.Tensor | None = None
        self.ms = 0.0

    def _call(self, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        saved = getattr(self.base, "rope_deltas", None)
        if hasattr(self.base, "rope_deltas"):
            self.base.rope_deltas = self.deltas
        try:
            with self.pipeline.suspended(), torch.no_grad():
                out = self.model(**kwargs, use_cache=True, return_dict=True)
            self.deltas = getattr(self.base, "rope_deltas", None)
        finally:
            if hasattr(self.base, "rope_deltas"):
                self.base.rope_deltas = saved
        self.cache = find_cache(out)
        self.ms += (time.perf_counter() - t0) * 1e3
        return out.logits[:, -1].float()

    def begin(self) -> torch.Tensor:
        kw = dict(self.inputs)
        if "pixel_values" not in kw or "image_grid_thw" not in kw:  # Qwen with an image builds its own M-RoPE
            kw["position_ids"] = text_positions(self.mask)
        return self._call(**kw)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(tokens, dtype=self.mask.dtype)], 1)
        pos = text_positions(self.mask)[:, -tokens.shape[1]:]
        if self.deltas is not None:  # M-RoPE: text tokens after the image share one offset in all 3 rows
            pos = (pos + self.deltas.to(pos.device))[None].expand(3, -1, -1)
        return self._call(input_ids=tokens, attention_mask=self.mask, position_ids=pos,
                          **{cache_kwarg(self.model.forward): self.cache})
