"""Shared pieces of the hallucination methods (VAR, VHR, FIA, PAI, VCD).

* key flags: which keys of a decoder layer's attention call are visual / sinks / selected (keys = the layer's
  group slots, then the decoded tokens: :meth:`mmeff.engine.state.State.key_positions`);
* the PAI-style logit boost ``a <- a + alpha * |a|`` on the last query row;
* the prompt without its image (PAI's and VHR's second input) and the last-position logits swap.
"""

from __future__ import annotations

from typing import Any

import torch

from mmeff.engine.state import State
from mmeff.errors import ConfigError


def check_layers(name: str, start: int, end: int | None, n_layers: int) -> range:
    """The 0-based decoder layers ``[start, end)`` (``end`` None: all remaining layers), validated."""
    stop = n_layers if end is None else end
    if not 0 <= start < stop <= n_layers:
        raise ConfigError(f"{name}: layers [{start}, {end}) do not fit a {n_layers}-layer decoder")
    return range(start, stop)


def key_flags(state: State, layer: int, k_len: int, flags: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: ``flags`` ([B, n] over original positions, n >= n_prompt; later positions False) at the
    layer's keys; fill slots are False."""
    index, valid = state.key_positions(layer)
    if index.shape[1] != k_len:
        raise RuntimeError(f"layer {layer}: {k_len} keys but the layer holds {index.shape[1]} slots at this step")
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
