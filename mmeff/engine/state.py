"""Per-generation runtime state: which tokens each decoder layer sees, and how to shrink tensors to them.

Coordinates. "Original" positions index the decoder input as the model built it (the padded prompt, then
each decoded token). A token *selection* made before layer ``l`` defines a *group*: layers ``l..`` see only the
``index[b, :]`` original positions of sample ``b``. Batches are ragged (samples keep different numbers of
tokens), so a group is padded to its longest sample with *fill* slots: distinct dropped positions marked
``valid = False``, which no real query can attend to (each fill slot sees only itself, so no row of the
attention is empty and no NaN appears). Selections compose: a later group indexes a subset of the earlier one.

The KV cache of a layer in group g holds ``len(index)`` prompt slots followed by the decoded tokens, while
the masks and position ids the model builds stay in original coordinates (see :mod:`mmeff.engine.cache`): each layer
gathers the mask columns of its own slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmeff.families.base import ImageSpan


@dataclass
class Group:
    start_layer: int
    index: torch.Tensor  # [B, L] long: original positions held, ascending per row
    valid: torch.Tensor  # [B, L] bool: False for fill slots
    order: torch.Tensor | None = None  # [B, L] positions in the previous group's slots (None for the identity)
    full: bool | None = None  # every slot valid (no fill slots), when known without reading the device


@dataclass
class State:
    """What one ``generate`` (or one forward) knows about its sequence, shared by the pipeline and methods."""

    spans: list[list[ImageSpan]]
    visual: torch.Tensor  # [B, N] bool, original coordinates
    layout: torch.Tensor  # [B, N] bool: visual layout tokens (newlines) that pruners must keep
    attention_mask: torch.Tensor | None  # [B, N] 2-D padding mask of the prompt (1 = real token)
    n_prompt: int
    groups: list[Group] = field(default_factory=list)
    phase: str = "prefill"  # or "decode"
    decoded: int = 0  # tokens appended after the prompt (decode steps so far, in tokens)
    saved_hidden: list[torch.Tensor] = field(default_factory=list)  # prefill: full states at each selection
    span_inputs: dict[str, Any] = field(default_factory=dict)  # the forward inputs the spans came from (sizes, grids)
    step_tokens: int = 1  # decode: tokens fed by the current call
    method_data: dict[str, Any] = field(default_factory=dict)  # each method's ``Data``, by method name
    static_run: Any = None  # the static decode of this generation (mmeff.engine.static_decode), once begun
    host_prunable: list[int] | None = None  # per sample: visual non-layout tokens (host-side, from the spans)

    @property
    def batch_size(self) -> int:
        return self.visual.shape[0]

    @property
    def group(self) -> Group:
        return self.groups[-1]

    def group_for(self, layer: int) -> Group:
        g = self.groups[0]
        for cand in self.groups:
            if cand.start_layer <= layer:
                g = cand
        return g

    def decode_slots(self, g: Group, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """At a decode step, a layer of group ``g`` attends to its prompt slots followed by every decoded token:
        (query positions [B, q], key positions [B, slots + decoded + q], key validity (``valid`` of the prompt
        slots, default ``g.valid``; decoded tokens always valid)), in original coordinates."""
        q = self.step_tokens
        start = self.n_prompt + self.decoded
        new = torch.arange(self.n_prompt, start + q, device=g.index.device).expand(g.index.shape[0], -1)
        k_valid = torch.cat([g.valid if valid is None else valid, torch.ones_like(new, dtype=torch.bool)], 1)
        return new[:, -q:], torch.cat([g.index, new], 1), k_valid

    def key_positions(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, K] original position, [B, K] valid) of the keys decoder layer ``layer``'s attention sees at this
        step: its group's slots, then (decode) every decoded token."""
        g = self.group_for(layer)
        if self.phase == "prefill":
            return g.index, g.valid
        return self.decode_slots(g)[1:]

    def visual_in_group(self, g: Group) -> torch.Tensor:
        """[B, L] bool: which slots of a group are (valid) visual tokens."""
        return torch.gather(self.visual, 1, g.index) & g.valid

    def prunable_in_group(self, g: Group) -> torch.Tensor:
        """[B, L] bool: visual, non-layout, valid slots — what pruners may drop."""
        return torch.gather(self.visual & ~self.layout, 1, g.index) & g.valid

    def kept_visual_per_layer(self, n_layers: int) -> torch.Tensor:
        """[B, n_layers] number of visual tokens each layer attends to (measured from the groups)."""
        per_group = {id(g): self.visual_in_group(g).sum(1) for g in self.groups}  # a few groups, many layers
        return torch.stack([per_group[id(self.group_for(layer))] for layer in range(n_layers)], 1)


def identity_group(batch: int, n: int, device: torch.device) -> Group:
    index = torch.arange(n, device=device).expand(batch, n).contiguous()
    return Group(0, index, torch.ones(batch, n, dtype=torch.bool, device=device), full=True)


def select(prev: Group, keep: torch.Tensor, start_layer: int, n_new: int | None = None,
           uniform: bool = False) -> Group:
    """The group that keeps ``keep[b, j]`` slots of ``prev`` (invalid slots are never kept).

    Rows are padded to the longest with the earliest dropped slots, as invalid fill slots. ``n_new``: the
    longest row's count, when the caller knows it from the host (saves a host synchronisation); ``uniform``:
    every row keeps ``n_new`` (so no fill slot: the group is ``full``).
    """
    keep = keep & prev.valid
    if n_new is None:
        n_new = int(keep.sum(1).max())
    length = keep.shape[1]
    slot = torch.arange(length, device=keep.device).expand_as(keep)
    rank = torch.where(keep, slot, slot + length)  # kept first (in order), then dropped
    order = rank.argsort(dim=1)[:, :n_new].sort(dim=1).values
    return Group(
        start_layer,
        torch.gather(prev.index, 1, order),
        torch.gather(keep, 1, order),
        order,
        full=True if uniform else None,
    )


def gather_seq(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``t`` along its sequence axis ``dim`` by ``order`` [B, L]; the batch axis is the one before
    ``dim`` (size B or 1 — broadcast), any axes before it are kept (M-RoPE's 3 rows), axes after are carried."""
    dim = dim % t.ndim
    bdim = dim - 1
    shape = list(t.shape)
    shape[bdim] = order.shape[0]
    t = t.expand(*shape)
    view = [1] * t.ndim
    view[bdim], view[dim] = order.shape
    idx_shape = list(t.shape)
    idx_shape[dim] = order.shape[1]
    return torch.gather(t, dim, order.view(view).expand(idx_shape))


def restrict_mask(
    mask: torch.Tensor | None,
    q_index: torch.Tensor | None,
    k_index: torch.Tensor,
    k_valid: torch.Tensor,
    q_len: int,
    causal_orig: tuple[torch.Tensor, torch.Tensor] | None = None,
    full: bool | None = None,
) -> torch.Tensor | None:
    """Restrict a 4-D attention mask (bool: True = attend, or additive float) in original coordinates to the
    slots a layer holds: rows ``q_index`` (None: keep the rows), columns ``k_index``; invalid key slots are
    hidden except from themselves. ``mask=None`` (SDPA's implicit causal mask) is materialised only when
    needed: ``causal_orig`` = (query, key) original positions to build it from. ``full``: every key slot is known
    valid (no device read).
    """
    if mask is None:
        if full or (full is None and bool(k_valid.all())):
            return None  # still a plain causal (or full, in decode) pattern over sorted slots
        q_pos, k_pos = causal_orig
        allowed = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    else:
        if mask.shape[0] != k_index.shape[0]:
            mask = mask.expand(k_index.shape[0], *mask.shape[1:])
        if q_index is not None:
            mask = _gather_axis(mask, q_index, 2)
        allowed = _gather_axis(mask, k_index, 3)
        if allowed.dtype != torch.bool:
            return _restrict_float(allowed, k_valid, q_index, k_index)
    fill = ~k_valid[:, None, None, :]
    return (allowed & ~fill) | (_self_slot(q_index, k_index, q_len) & fill)


def _gather_axis(mask: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """Gather rows (axis 2) or columns (axis 3) of a [B, heads, q, k] mask by a per-sample index [B, L]."""
    shape = list(mask.shape)
    shape[axis] = index.shape[1]
    view = [index.shape[0], 1, 1, 1]
    view[axis] = index.shape[1]
    return torch.gather(mask, axis, index.view(view).expand(shape))


def _self_slot(q_index: torch.Tensor | None, k_index: torch.Tensor, q_len: int) -> torch.Tensor:
    if q_index is None:  # decode: queries are new tokens, never fill slots
        return torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=k_index.device)
    return (q_index[:, :, None] == k_index[:, None, :])[:, None]


def _restrict_float(
    mask: torch.Tensor, k_valid: torch.Tensor, q_index: torch.Tensor | None, k_index: torch.Tensor
) -> torch.Tensor:
    fill = ~k_valid[:, None, None, :]
    own = _self_slot(q_index, k_index, mask.shape[-2]) & fill  # a fill slot sees only itself
    return mask.masked_fill(fill, torch.finfo(mask.dtype).min).masked_fill(own, 0.0)
