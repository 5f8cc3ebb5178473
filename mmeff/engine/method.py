"""The method interface: what a method may do at each insertion point, in data-flow order.

image -> encoder -> (a) ``Point.INPUT``: select/merge visual tokens before decoder layer 0
       -> decoder layers with (b) ``Point.LAYER`` hooks: token selection before a layer, attention hooks
          (statistics, score/probability changes), head-output scaling before ``o_proj``
       -> (c) ``Point.CACHE``: the KV-cache layer class
       -> (d) ``Point.LOGITS``: a change of the output logits (contrastive decoding).

A method subclasses :class:`Method`, declares its ``points`` and overrides only the hooks it uses; the
pipeline calls them with the phase-aware :class:`~mmeff.engine.state.State` ("prefill" / "decode").
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmeff.config import MethodConfig
from mmeff.engine.state import State
from mmeff.families.base import Adapter

if TYPE_CHECKING:
    from mmeff.engine.cache import SlotLayer
    from mmeff.engine.pipeline import Pipeline


class Point(str, Enum):
    INPUT = "input"
    LAYER = "layer"
    CACHE = "cache"
    LOGITS = "logits"


# Points where two methods would fight over one decision: at most one method may use each.
EXCLUSIVE_POINTS = frozenset({Point.INPUT, Point.CACHE, Point.LOGITS})

Selection = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Method:
    """Base class: a no-op at every point. ``config_cls`` is set by :func:`mmeff.config.register_method`."""

    config_cls: ClassVar[type[MethodConfig]]
    points: ClassVar[frozenset[Point]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()  # names of methods this one cannot run with
    families: ClassVar[tuple[str, ...] | None] = None  # None: every family
    # decode steps are plain attention over the kept slots (no hooks, extra forwards or own cache), so
    # ``cuda_graphs`` may replay them from a CUDA graph (mmeff.engine.static_decode)
    graphable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, adapter: Adapter) -> None:
        self.config = config
        self.adapter = adapter

    @property
    def name(self) -> str:
        return self.config.method

    def validate(self, n_layers: int) -> None:
        """Raise :class:`~mmeff.errors.ConfigError` if the config cannot run on this model."""

    def attach(self, pipeline: Pipeline) -> None:
        """Install extra torch hooks through ``pipeline.add_hook`` (removed on unwrap)."""

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        """Start of a prefill: spans are known, nothing has run yet."""

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> Selection | None:
        """Prefill, before decoder layer ``layer`` (0 = the input stage): a [B, L] keep mask over the current
        slots, or (keep, hidden) with changed hidden states (token merging), or None for no change."""
        return None

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        """Hooks (see :class:`mmeff.engine.attention.AttentionHook`) for decoder layer ``layer`` at this step."""
        return []

    def head_scale(self, layer: int, state: State) -> torch.Tensor | None:
        """[B or 1, heads] factors applied to each head's output before ``o_proj``, or None."""
        return None

    def cache_layer(self, layer: int) -> SlotLayer | None:
        """Point.CACHE: the cache layer object for decoder layer ``layer``."""
        return None

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Point.LOGITS: the final logits of this forward call, changed."""
        return logits

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Method, hook)
