"""The KV-cache insertion point.

When any stage removes tokens, a decoder layer's cache holds fewer entries than the sequence the model
believes it has. :class:`SlotLayer` (a ``DynamicLayer``) stores only the slots its layer keeps but reports the
*virtual* length — prompt length plus decoded tokens — to ``get_seq_length`` / ``get_mask_sizes``. So
everything transformers derives from the cache (masks, ``generate``'s input slicing, default position ids)
stays in original coordinates, and each layer gathers its own mask columns (:mod:`mmeff.engine.state`).

Methods that compress or quantize the cache subclass :class:`SlotLayer` and hand the pipeline a factory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from mmeff.errors import UnsupportedModelError

# transformers >= 5.24 passes the KV cache as ``cache`` (``past_key_values`` before; still accepted, deprecated)
CACHE_KWARGS = ("cache", "past_key_values")


def find_cache(source: Mapping[str, Any] | Any) -> Cache | None:
    """The KV cache among a call's arguments or in a model output, under either transformers name."""
    for key in CACHE_KWARGS:
        found = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
        if found is not None:
            return found
    return None


def cache_kwarg(fn: Callable[..., Any]) -> str:
    """The name ``fn`` (a ``forward``) takes the KV cache by, in the installed transformers."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class SlotLayer(DynamicLayer):
    """A dynamic cache layer whose reported length counts the slots a token selection removed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.removed = 0  # virtual positions not stored (prompt length - slots kept)
        # static decode (engine.static_decode): keys/values are buffers with spare columns; ``filled`` of them hold
        # tokens and ``slot`` (a device index) is where the next token goes
        self.filled: int | None = None
        self.slot: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        stored = self.stored_length()
        return stored + self.removed if stored or self.removed else 0

    def get_mask_sizes(self, query_length: int, *args: object) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def stored_length(self) -> int:
        return super().get_seq_length() if self.filled is None else self.filled

    def reserve(self, extra: int) -> None:
        """Move the stored slots into buffers with ``extra`` spare columns (zeros: a masked column must not hold
        NaN bits, which a zero attention weight would still propagate). Later single-token updates write in place
        at ``slot``; the caller advances ``filled``."""
        stored = self.stored_length()
        b, h, _, d = self.keys.shape
        keys = self.keys.new_zeros(b, h, stored + extra, d)
        values = self.values.new_zeros(b, h, stored + extra, self.values.shape[-1])
        keys[:, :, :stored] = self.keys[:, :, :stored]
        values[:, :, :stored] = self.values[:, :, :stored]
        self.keys, self.values, self.filled = keys, values, stored

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.filled is None:
            return super().update(key_states, value_states, *args, **kwargs)
        # static: the whole buffer goes to attention, whose mask hides the columns not filled yet
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (what the cache really stores)."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def crop(self, tokens_to_remove: int) -> None:
        if self.filled is not None:
            raise NotImplementedError("mmeff static decode (cuda_graphs) does not support cropping the cache")
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("mmeff token selection does not support beam search / num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("mmeff token selection does not support beam search / contrastive search")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("mmeff token selection does not support beam search")


LayerFactory = Callable[[int], SlotLayer]


def install_slot_layers(cache: Cache | None, n_layers: int, factory: LayerFactory | None = None) -> Cache:
    """Make ``cache`` (a fresh ``DynamicCache``, or None to create one) hold :class:`SlotLayer` layers, in place.

    In place keeps the object ``generate`` holds. Any other cache class is refused: its fixed-size layers
    cannot hold a token selection.
    """
    if cache is None:
        cache = DynamicCache()
    if type(cache) is not DynamicCache:
        raise UnsupportedModelError(
            f"mmeff stages that remove tokens or own the KV cache need a DynamicCache, got {type(cache).__name__} "
            "(use the default cache_implementation)"
        )
    if cache.get_seq_length() != 0:
        raise UnsupportedModelError("mmeff must start from an empty cache (prefill in one forward call)")
    factory = factory or (lambda i: SlotLayer())
    for layer in cache.layers:
        if type(layer) is not DynamicLayer and not isinstance(layer, SlotLayer):
            raise UnsupportedModelError(
                f"mmeff token selection does not support {type(layer).__name__} cache layers (sliding window)"
            )
    cache.layers = [factory(i) for i in range(n_layers)]
    return cache


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes the cache's tensors hold, measured from the tensors themselves."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if isinstance(layer, SlotLayer):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total
