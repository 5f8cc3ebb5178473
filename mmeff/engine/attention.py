"""The in-layer attention insertion point, through transformers' ``AttentionInterface``.

mmeff registers ``mmeff_sdpa`` and ``mmeff_eager``: attention functions that call the model's own SDPA or
eager attention unless a method has a hook on that module for the current step. Hooks can

* read statistics (``AttentionCall.received``) — computed beside the SDPA pass, without switching the layer to
  eager attention and without holding the whole attention matrix;
* change pre-softmax scores or post-softmax probabilities — only those layers take the eager path.

The decoder's config is switched to the ``mmeff_*`` name on ``wrap`` and restored on ``unwrap``; the matching
mask functions are registered too, so the model builds exactly the masks it built before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmeff.kernels.attention_stats import received_attention

BASES = ("sdpa", "eager")
PREFIX = "mmeff_"


@dataclass
class AttentionCall:
    """One attention computation inside a decoder (or vision) layer, as a hook sees it."""

    module: nn.Module
    layer: int
    phase: str
    query: torch.Tensor  # [B, H, q, d] (rotary applied)
    key: torch.Tensor  # [B, Hkv, k, d] (cache included)
    value: torch.Tensor
    mask: torch.Tensor | None  # 4-D bool or additive, or None (causal)
    scaling: float
    extra: dict[str, Any] = field(default_factory=dict)
    geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (q_pos, k_pos, k_valid)

    def received(self, query_weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, k] attention each key receives, mean over heads and the weighted query rows (None: all rows).

        On CUDA this is the fused Triton kernel (positions instead of the mask, nothing materialised)."""
        return received_attention(self.query, self.key, self.mask, self.scaling, query_weights, self.geometry)


class AttentionHook(Protocol):
    """What a method attaches to one attention module for one step. Every member is optional."""

    def observe(self, call: AttentionCall) -> None: ...

    def modify_scores(self, call: AttentionCall, scores: torch.Tensor) -> torch.Tensor: ...

    def modify_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor: ...

    def replace(self, call: AttentionCall) -> torch.Tensor | None:
        """The layer's whole attention output [B, q, H, d] (e.g. sparse attention), or None to leave it."""


@dataclass
class Site:
    """An attention module the pipeline watches: its layer index and a provider of this step's hooks."""

    layer: int
    hooks: Callable[[], list[Any]]
    phase: Callable[[], str]
    geometry: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = lambda: None


SITES: WeakKeyDictionary[nn.Module, Site] = WeakKeyDictionary()


def _model_eager(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The eager attention function of the module's own modeling file (it handles GQA the model's way)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _modified_eager(
    call: AttentionCall, hooks: list[Any], dropout: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the hooks' score/probability changes (float32 softmax, like the models' eager)."""
    q, k, v = call.query, call.key, call.value
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * call.scaling
    if call.mask is not None:
        mask = call.mask
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        scores = scores + mask
    elif q.shape[2] > 1:
        q_pos = torch.arange(q.shape[2], device=q.device)[:, None] + (k.shape[2] - q.shape[2])
        scores = scores.masked_fill(torch.arange(k.shape[2], device=q.device) > q_pos, torch.finfo(scores.dtype).min)
    for hook in hooks:
        if hasattr(hook, "modify_scores"):
            scores = hook.modify_scores(call, scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    for hook in hooks:
        if hasattr(hook, "modify_probs"):
            probs = hook.modify_probs(call, probs)
    probs = nn.functional.dropout(probs.to(q.dtype), p=dropout, training=training)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def _make(base: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base_fn = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else _model_eager(module)
        scaling = module.scaling if scaling is None else scaling
        site = SITES.get(module)
        hooks = site.hooks() if site is not None else []
        if not hooks:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        call = AttentionCall(
            module, site.layer, site.phase(), query, key, value, attention_mask, scaling, kwargs, site.geometry()
        )
        for hook in hooks:
            if hasattr(hook, "observe"):
                hook.observe(call)
        for hook in hooks:  # a replacing hook (sparse attention) takes precedence over score/prob changes
            if hasattr(hook, "replace") and (out := hook.replace(call)) is not None:
                return out, None
        if any(hasattr(h, "modify_scores") or hasattr(h, "modify_probs") for h in hooks):
            return _modified_eager(call, hooks, dropout, module.training)
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def register() -> None:
    """Register the ``mmeff_*`` attention and mask functions (idempotent)."""
    for base in BASES:
        name = PREFIX + base
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _make(base))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
