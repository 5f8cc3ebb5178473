"""What mmeff needs to know about a model family, behind one small interface.

An adapter answers, for one family of HF VLMs: where the decoder and its layers are, which tokens of each
sample are visual (found from ``input_ids``, never from hard-coded lengths), how each image's tokens are laid
out in 2-D (tiles of rows x cols, with layout tokens such as LLaVA-NeXT's row newlines), and where the vision
tower's attention lives. Kept tokens keep their original position ids: position ids and rotary embeddings are
gathered along the sequence axis (the last axis of ids, of any leading shape — M-RoPE's 3 rows included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mmeff.errors import ImageTokenMismatchError


@dataclass(frozen=True)
class Tile:
    """A rows x cols grid of visual tokens stored row-major from ``offset`` (relative to the span start).

    With ``newline`` every row is followed by one layout token (LLaVA-NeXT's ``image_newline``).
    """

    offset: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def length(self) -> int:
        return self.rows * (self.cols + int(self.newline))


@dataclass(frozen=True)
class ImageSpan:
    """The tokens of one image inside one sample: ``[start, start + length)`` in the padded sequence."""

    start: int
    length: int
    image_index: int
    tiles: tuple[Tile, ...]
    trailing_layout: int = 0  # layout tokens after the last tile (LLaVA-NeXT's single-tile newline)

    @property
    def end(self) -> int:
        return self.start + self.length

    def grid(self) -> dict[str, torch.Tensor]:
        """Per token of the span: ``tile``, ``row``, ``col`` (−1 for trailing layout) and ``layout`` (bool)."""
        tile = torch.full((self.length,), -1, dtype=torch.long)
        row = torch.full((self.length,), -1, dtype=torch.long)
        col = torch.full((self.length,), -1, dtype=torch.long)
        layout = torch.ones(self.length, dtype=torch.bool)
        for t, tl in enumerate(self.tiles):
            stride = tl.cols + int(tl.newline)
            r, c = torch.meshgrid(torch.arange(tl.rows), torch.arange(stride), indexing="ij")
            sl = slice(tl.offset, tl.offset + tl.length)
            tile[sl], row[sl], col[sl] = t, r.flatten(), c.flatten()
            layout[sl] = (c >= tl.cols).flatten()
        return {"tile": tile, "row": row, "col": col, "layout": layout}

    def offset_of(self, tile: int, row: int, col: int) -> int:
        """Token offset (relative to ``start``) of grid cell (row, col) of a tile: the inverse of :meth:`grid`."""
        tl = self.tiles[tile]
        if not (0 <= row < tl.rows and 0 <= col < tl.cols):
            raise IndexError(f"cell ({row}, {col}) outside tile {tile} of {tl.rows}x{tl.cols}")
        return tl.offset + row * (tl.cols + int(tl.newline)) + col


@dataclass
class VisionCall:
    """One vision-tower attention layer about to run, as an encoder observer (``Point.ENCODER``) sees it.

    ``hidden`` / ``kwargs``: the attention module's input; ``pixels`` / ``grid``: the tower call's input (Qwen's
    ``grid_thw``; None for CLIP towers). Family specifics — how q/k are projected (rotary for Qwen), which
    positions attend to each other, how patches become LLM tokens — are the adapter's (:class:`Adapter`).
    """

    layer: int
    module: nn.Module
    hidden: torch.Tensor
    kwargs: dict[str, Any]
    pixels: torch.Tensor
    grid: torch.Tensor | None
    adapter: Adapter
    _qk: tuple[torch.Tensor, torch.Tensor, float] | None = field(default=None, repr=False)

    def qk(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(q, k [H, S, D] over the call's S packed positions, rotary applied; the attention's scale)."""
        if self._qk is None:
            self._qk = self.adapter.vision_qk(self)
        return self._qk

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """([S] attention block of each position (positions attend within their block), [S] vision unit (a CLIP
        tile, a Qwen image), number of units)."""
        return self.adapter.vision_segments(self)

    def unit_tokens(self, scores: torch.Tensor, reduce: str = "sum") -> list[torch.Tensor]:
        """Per vision unit, the scores [S] of its positions as scores of the unit's LLM tokens (see
        :meth:`Adapter.unit_tokens`)."""
        return self.adapter.unit_tokens(self, scores, reduce)


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor as (start, length)."""
    padded = torch.cat([mask.new_zeros(1), mask.to(torch.int8), mask.new_zeros(1)])
    diff = padded.diff()
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


class Adapter:
    """Base adapter. Subclasses set ``family``/``model_classes`` and implement :meth:`image_layouts`."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    # extra forward kwargs the span computation needs (image sizes, grids), captured at prefill
    span_inputs: ClassVar[tuple[str, ...]] = ()
    # the model's whole forward (vision tower included) reads nothing back from the device, so a prefill can be
    # one CUDA graph (mmeff.engine.prefill_graph); False: only the decoder is (the tower / position ids sync)
    graph_whole_forward: ClassVar[bool] = True
    # small integer inputs the family's forward reads on the host (``.tolist()``): a captured whole forward gets
    # them as CPU tensors (their values are part of the graph's signature, so they never change under it)
    host_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def instance_patches(self, host: Any) -> list[tuple[Any, str, Any]]:
        """(object, method name, replacement) that the pipeline installs as instance attributes shadowing the
        method while attached (removed on detach), for family steps that must follow the token selection
        (Qwen3-VL's DeepStack additions); ``host``: the pipeline (its ``state``). None by default (empty)."""
        return []

    def capture_context(self) -> contextlib.AbstractContextManager[None]:
        """Entered around a CUDA-graph capture of the whole forward (and its CPU emulation): swaps out what of
        the family's forward reads the device although the eager first call of the same signature made it
        redundant (a sanity check, say). Nothing by default."""
        return contextlib.nullcontext()

    # -- structure ----------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The ``*Model`` inside the ``*ForConditionalGeneration`` (holds the towers)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.base.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.vision_tower

    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower  # CLIPVisionModel holds the encoder itself in transformers 5.x
        return getattr(tower, "vision_model", tower).encoder.layers

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def feature_layer(self) -> int | None:
        """Index in :meth:`vision_layers` of the deepest layer whose output the projector consumes, or None when
        that is the embeddings. LLaVA: ``config.vision_feature_layer`` indexes ``hidden_states`` (entry 0 = the
        embeddings, entry i = layer i - 1's output); a list of layers (concatenated features) gives the deepest."""
        chosen = self.model.config.vision_feature_layer
        n = len(self.vision_layers())
        deepest = max(i % (n + 1) for i in ([chosen] if isinstance(chosen, int) else chosen))
        return deepest - 1 if deepest > 0 else None

    vision_prefix: ClassVar[int] = 1  # leading non-patch positions of each unit in the tower (CLIP's CLS)
    mrope: ClassVar[bool] = False  # decoder position ids have 3 rows (M-RoPE)

    # -- the vision tower (Point.ENCODER): family-specific tower inputs, q/k, and patch -> token maps -----------
    def vision_call(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                    tower_args: tuple, tower_kwargs: dict[str, Any]) -> VisionCall:
        """The :class:`VisionCall` of vision layer ``layer``'s attention, from its and its tower's arguments."""
        hidden = args[0] if args else kwargs["hidden_states"]
        pixels = tower_args[0] if tower_args else tower_kwargs["pixel_values"]
        return VisionCall(layer, module, hidden, kwargs, pixels, None, self)

    def vision_qk(self, call: VisionCall) -> tuple[torch.Tensor, torch.Tensor, float]:
        """CLIP: q/k projections of every tile's positions (CLS first), packed to [H, tiles * L, D]."""
        module, hidden = call.module, call.hidden
        n, s, _ = hidden.shape
        heads = module.num_heads
        q = module.q_proj(hidden).view(n * s, heads, -1).transpose(0, 1)
        k = module.k_proj(hidden).view(n * s, heads, -1).transpose(0, 1)
        return q, k, module.scale

    def vision_segments(self, call: VisionCall) -> tuple[torch.Tensor, torch.Tensor, int]:
        """CLIP: each tile attends within itself and is its own unit."""
        n, s = call.hidden.shape[:2]
        ids = torch.arange(n, device=call.hidden.device).repeat_interleave(s)
        return ids, ids, n

    def unit_tokens(self, call: VisionCall, scores: torch.Tensor, reduce: str = "sum") -> list[torch.Tensor]:
        """Per unit, its positions' scores [S] as scores of its LLM tokens, row-major: CLIP drops the CLS
        position (one token per patch; ``reduce`` has nothing to merge)."""
        n, s = call.hidden.shape[:2]
        return list(scores.view(n, s)[:, self.vision_prefix :].unbind(0))

    def token_regions(self, pixels: torch.Tensor, grid: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """The normalised pixels of each LLM token's image region, [T, C, P] packed over units, and the units'
        token counts. CLIP: a token is one patch of its tile (row-major)."""
        patch = self.model.config.vision_config.patch_size
        n, c = pixels.shape[:2]
        x = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # n, c, nh, nw, p, p
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, patch * patch)
        return x, [x.shape[0] // n] * n

    def image_tokens(self, units: list[torch.Tensor], spans: list[ImageSpan], inputs: dict[str, Any]
                     ) -> list[torch.Tensor] | None:
        """Per image (in ``spans``' order, by ``image_index``), the scores of its non-layout tokens in span order,
        from the per-unit token scores of the tower (one unit per image here). None when the units do not add
        up to the images (the caller names the mismatch)."""
        if len(units) != len(spans):
            return None
        return list(units)

    # -- decoder positions --------------------------------------------------------------------------------------
    def prefill_position_ids(self, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for a prefill of ``inputs`` (left padded by ``mask``), as ``generate`` builds them, or None
        where the model must build its own."""
        return text_positions(mask)

    def text_position_ids(self, positions: torch.Tensor, rope_deltas: torch.Tensor | None) -> torch.Tensor:
        """Position ids [B, q] of text tokens after a prefill, in the decoder's form."""
        return positions

    def decode_position_ids(self, position_ids: torch.Tensor | None, batch: int, virtual: int,
                            device: torch.device) -> torch.Tensor:
        """One decode step's position ids as the decoder's forward would use them ([B, 1]; M-RoPE [3, B, 1]);
        ``virtual``: the token's index in the full sequence (what the decoder counts from when given none)."""
        if position_ids is None:
            position_ids = torch.full((1, 1), virtual, dtype=torch.long, device=device)
        return position_ids.expand(batch, 1)

    def rope_state(self) -> Any:
        """Per-sequence rotary state the model keeps between calls (Qwen's ``rope_deltas``), or None."""
        return None

    def set_rope_state(self, value: Any) -> None:
        """Restore what :meth:`rope_state` returned."""

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id),)

    # -- visual spans -------------------------------------------------------------------------------------
    def image_layouts(self, inputs: dict[str, Any], n_images: int) -> list[tuple[tuple[Tile, ...], int]]:
        """(tiles, trailing layout tokens) of each image of the batch, in prompt order."""
        raise NotImplementedError

    def spans(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> list[list[ImageSpan]]:
        """The image spans of every sample, found from the image placeholder tokens of ``input_ids``."""
        is_visual = torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device)).cpu()
        per_sample_runs = [runs(row) for row in is_visual]
        n_tokens = int(is_visual.sum())
        layouts = self.image_layouts(inputs, self._count_images(inputs, per_sample_runs))
        lengths = [sum(t.length for t in tiles) + trail for tiles, trail in layouts]
        if sum(lengths) != n_tokens:
            raise ImageTokenMismatchError(
                f"{self.family}: the prompt has {n_tokens} image tokens but the {len(lengths)} image(s) given need "
                f"{sum(lengths)} ({lengths}); build the prompt with the model's processor so each image "
                "placeholder is expanded to its feature count"
            )
        out: list[list[ImageSpan]] = []
        img = 0
        for b, sample_runs in enumerate(per_sample_runs):
            spans: list[ImageSpan] = []
            for start, length in sample_runs:
                pos = start
                while pos < start + length:  # a run may hold several adjacent images
                    if img >= len(layouts) or pos + lengths[img] > start + length:
                        raise ImageTokenMismatchError(
                            f"{self.family}: sample {b} has a run of {length} image tokens at position {start} that "
                            f"does not split into whole images (image sizes in order: {lengths})"
                        )
                    tiles, trail = layouts[img]
                    spans.append(ImageSpan(pos, lengths[img], img, tiles, trail))
                    pos += lengths[img]
                    img += 1
            out.append(spans)
        return out

    def _count_images(self, inputs: dict[str, Any], per_sample_runs: list[list[tuple[int, int]]]) -> int:
        raise NotImplementedError


def filled_on(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a small tensor) on ``device`` built from one fill per element: kernels with the values as
    constants, no host-to-device copy (which a CUDA-graph capture refuses from pageable memory)."""
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    flat = out.view(-1)
    for i, value in enumerate(host.flatten().tolist()):
        flat[i].fill_(value)
    return out


class _FilledTensors:
    """A module's ``torch`` during a capture: ``torch.tensor(host list, device=...)`` goes through
    :func:`filled_on`; everything else is torch."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def tensor(self, data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is None or isinstance(data, torch.Tensor) or torch.device(device).type == "cpu":
            return self._real.tensor(data, *args, device=device, **kwargs)
        return filled_on(self._real.tensor(data, *args, **kwargs), device)


@contextlib.contextmanager
def device_lists_filled(module: Any) -> Iterator[None]:
    """While entered, ``torch.tensor(list, device=...)`` inside the Python module ``module`` (a transformers
    modeling file) builds the tensor with fills instead of copying it from the host; see :func:`filled_on`."""
    real = module.torch
    module.torch = _FilledTensors(real)
    try:
        yield
    finally:
        module.torch = real


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` builds them (padding at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
