"""The method interface: what a method may do at each insertion point, in data-flow order, and the registry.

image -> encoder with (a0) ``Point.ENCODER``: observe chosen vision-tower layers' attention inputs
      -> (a) ``Point.INPUT``: select/merge visual tokens before decoder layer 0
      -> decoder layers with (b) ``Point.LAYER`` hooks: token selection before a layer, the layer's input,
         attention hooks (statistics, score/probability changes, replacement), head outputs before ``o_proj``
      -> (c) ``Point.CACHE``: the KV-cache layer class
      -> (d) ``Point.LOGITS``: a change of the output logits (contrastive decoding).

A method subclasses :class:`Method`, declares its ``points`` and overrides only the hooks it uses; the pipeline
calls them, in the order this class lists them, with the phase-aware :class:`~mmeff.engine.state.State`
("prefill" / "decode"). A method never installs torch hooks itself: what it needs from the run beyond its
hooks — a second sequence on the unwrapped model, one decoder layer run on other inputs, the model's own
decoder inputs for a prompt, a probe of one layer's attention — it asks of its :class:`Host`.

Per-generation data lives in the state, typed: a method that needs some sets ``Data`` to a dataclass; the
pipeline makes a fresh one per prefill and ``self.data(state)`` returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from mmeff.config import MethodConfig
from mmeff.engine.state import State
from mmeff.errors import ConfigError, UnknownPresetError
from mmeff.families.base import Adapter, VisionCall

if TYPE_CHECKING:
    from mmeff.engine.cache import SlotLayer
    from mmeff.engine.side_stream import SideStream


class Point(str, Enum):
    ENCODER = "encoder"
    INPUT = "input"
    LAYER = "layer"
    CACHE = "cache"
    LOGITS = "logits"


# Points where two methods would fight over one decision: at most one method may use each.
EXCLUSIVE_POINTS = frozenset({Point.INPUT, Point.CACHE, Point.LOGITS})



@dataclass
class Kept:
    """A selection whose counts are known on the host: ``longest`` = the largest number of slots a row keeps,
    ``uniform`` = every row keeps that many. The pipeline then never reads a count from the device (what a
    captured prefill needs, :mod:`mmeff.engine.prefill_graph`)."""

    keep: torch.Tensor  # [B, L] bool over the current slots
    hidden: torch.Tensor | None = None  # changed hidden states (token merging), or None
    longest: int | None = None
    uniform: bool = False


Selection = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Kept


class Host(Protocol):
    """What a method may ask of the run it is attached to (implemented by the pipeline)."""

    @property
    def model(self) -> nn.Module: ...

    def side_stream(self, inputs: dict[str, Any]) -> SideStream:
        """A second sequence decoded in lock-step by the unwrapped model, with its own KV cache."""

    def decoder_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(hidden states, keyword arguments) decoder layer 0 receives when the unwrapped model runs ``inputs``
        (nothing after the embeddings runs)."""

    def run_layer(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any],
                  heads: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """Decoder layer ``layer`` of the unwrapped model on other inputs; ``heads`` sees (and may replace) its
        head outputs before ``o_proj``."""

    def probe_attention(self, layer: int, hidden: torch.Tensor, hooks: list[Any]) -> None:
        """Run decoder layer ``layer``'s input norm and attention on ``hidden`` (the layer's own prefill mask and
        positions, no KV cache), with the attention ``hooks``; its output is discarded."""


class Method:
    """Base class: a no-op at every point. ``config_cls`` is set by :func:`register_method`."""

    config_cls: ClassVar[type[MethodConfig]]
    points: ClassVar[frozenset[Point]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()  # names of methods this one cannot run with
    families: ClassVar[tuple[str, ...] | None] = None  # None: every family
    # decode steps are plain attention over the kept slots (no hooks, extra forwards or own cache), so
    # ``cuda_graphs`` may replay them from a CUDA graph (mmeff.engine.static_decode)
    graphable: ClassVar[bool] = False
    # per-generation data (a dataclass with defaults), made fresh at every prefill: ``self.data(state)``
    Data: ClassVar[type | None] = None

    def __init__(self, config: MethodConfig, adapter: Adapter) -> None:
        self.config = config
        self.adapter = adapter
        self.host: Host | None = None  # set by the pipeline
        self.vision_layers: tuple[int, ...] = ()  # Point.ENCODER: vision layers observed (0-based, set in validate)

    @property
    def name(self) -> str:
        return self.config.method

    def data(self, state: State) -> Any:
        """This method's per-generation data in ``state`` (an instance of ``Data``)."""
        return state.method_data[self.name]

    def validate(self, n_layers: int) -> None:
        """Raise :class:`~mmeff.errors.ConfigError` if the config cannot run on this model."""

    # -- hooks, in the order the pipeline calls them -------------------------------------------------------
    def observe_vision(self, call: VisionCall, state: State | None) -> None:
        """Point.ENCODER: the input of vision layer ``call.layer``'s attention (one of ``vision_layers``).
        ``state``: the prefill's state when the tower runs inside the prefill forward, None when it runs before
        (``generate`` encodes images first; ``begin`` comes later). Keep what a prefill reads in the state where
        there is one: a replayed prefill graph copies the state, not the method."""

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        """Start of a prefill: spans are known, the decoder has not run yet."""

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> Selection | None:
        """Prefill, before decoder layer ``layer`` (0 = the input stage): a [B, L] keep mask over the current
        slots, or (keep, hidden) with changed hidden states (token merging), or a :class:`Kept` that also gives
        the counts from the host, or None for no change."""
        return None

    def layer_input(self, layer: int, state: State, hidden: torch.Tensor) -> None:
        """Decoder layer ``layer``'s input hidden states, after every selection, over the slots the layer holds."""

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        """Hooks (see :class:`mmeff.engine.attention.AttentionHook`) for decoder layer ``layer`` at this step."""
        return []

    def observe_heads(self, layer: int, state: State, heads: torch.Tensor) -> None:
        """The per-head attention outputs [B, q, H * d] entering ``o_proj`` of decoder layer ``layer``, before
        any ``head_scale``."""

    def head_scale(self, layer: int, state: State) -> torch.Tensor | None:
        """[B or 1, heads] factors applied to each head's output before ``o_proj``, or None."""
        return None

    def cache_layer(self, layer: int) -> SlotLayer | None:
        """Point.CACHE: the cache layer object for decoder layer ``layer``."""
        return None

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Point.LOGITS: the final logits of this forward call, changed."""
        return logits

    def stats(self, state: State) -> dict[str, Any]:
        """Measurements of this prefill, asked for at its end (``handle.stats`` merges them). Tensors are fine and
        preferred to host values: they are read back only when ``handle.stats`` is read."""
        return {}

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Method, hook)


# -- the registry ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[type[MethodConfig], type[Method]]] = {}


def register_method(config_cls: type[MethodConfig], method_cls: type[Method]) -> None:
    """Bind a config class to the method class that implements it, under ``config_cls.method``
    (peft's ``register_peft_method`` pattern). Duplicate names are rejected."""
    name = config_cls.method
    if not name:
        raise ConfigError(f"{config_cls.__name__}.method must be a non-empty name")
    if name in _REGISTRY:
        raise ConfigError(f"method {name!r} is already registered (by {_REGISTRY[name][1].__name__})")
    _REGISTRY[name] = (config_cls, method_cls)
    method_cls.config_cls = config_cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type[MethodConfig], type[Method]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPresetError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None

