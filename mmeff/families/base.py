"""What mmeff needs to know about a model family, behind one small interface.

An adapter answers, for one family of HF VLMs: where the decoder and its layers are, which tokens of each
sample are visual (found from ``input_ids``, never from hard-coded lengths), how each image's tokens are laid
out in 2-D (tiles of rows x cols, with layout tokens such as LLaVA-NeXT's row newlines), and where the vision
tower's attention lives. Kept tokens keep their original position ids: position ids and rotary embeddings are
gathered along the sequence axis (the last axis of ids, of any leading shape — M-RoPE's 3 rows included).
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def __init__(self, model: nn.Module) -> None:
        self.model = model

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

    has_cls_token: ClassVar[bool] = True

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
