"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a base tile, then the anyres tiles unpadded to the
image's aspect ratio with one ``image_newline`` token closing every row (the layout tokens pruners keep)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from mmeff.errors import ImageTokenMismatchError
from mmeff.families.base import ImageSpan, Tile, device_lists_filled
from mmeff.families.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    span_inputs = ("image_sizes",)
    host_inputs = ("image_sizes",)  # the anyres grid is chosen on the host from them (``image_sizes.tolist()``)

    @contextlib.contextmanager
    def capture_context(self) -> Iterator[None]:
        """LLaVA's placeholder mask (:meth:`LlavaAdapter.capture_context`), and ``pack_image_features``' last line,
        ``torch.tensor(feature_lens, device=...)`` (a host list copied to the device, which a capture refuses),
        built from fills instead: the lengths are host ints fixed by the signature's image sizes."""
        with super().capture_context(), device_lists_filled(modeling_llava_next):
            yield

    def _count_images(self, inputs: dict[str, Any], per_sample_runs: list[list[tuple[int, int]]]) -> int:
        if inputs.get("image_sizes") is None:
            if any(per_sample_runs):
                raise ImageTokenMismatchError("llava_next: the prompt has image tokens but no image_sizes were given")
            return 0
        return len(inputs["image_sizes"])

    def image_layouts(self, inputs: dict[str, Any], n_images: int) -> list[tuple[tuple[Tile, ...], int]]:
        cfg = self.model.config
        side = self._side()
        lead = 1 if cfg.vision_feature_select_strategy == "full" else 0
        base = Tile(lead, side, side)
        out = []
        for size in inputs["image_sizes"][:n_images]:
            size = torch.as_tensor(size).tolist()
            rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            # the unpadded grid's shape, computed by the same function the model applies to its features
            h, w = unpad_image(torch.empty(1, rows * side, cols * side), torch.tensor(size)).shape[1:]
            out.append(((base, Tile(lead + base.length, int(h), int(w), newline=True)), lead))
        return out

    def image_tokens(self, units: list[torch.Tensor], spans: list[ImageSpan], inputs: dict[str, Any]
                     ) -> list[torch.Tensor] | None:
        """Each image is its base tile, then its anyres tiles stitched into one grid and unpadded exactly as the
        model lays out their features (row newlines are layout, not scored)."""
        cfg = self.model.config
        out: list[torch.Tensor] = []
        pos = 0
        for sp in spans:
            size = torch.as_tensor(inputs["image_sizes"][sp.image_index]).tolist()
            rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            tiles = units[pos : pos + 1 + rows * cols]
            pos += 1 + rows * cols
            if len(tiles) != 1 + rows * cols:
                return None
            grid = stitch_tiles(tiles[1:], rows, cols, sp.tiles[0].rows, size)[0]
            out.append(torch.cat([tiles[0], grid.flatten()]))
        return out if pos == len(units) else None


def stitch_tiles(tiles: list[torch.Tensor], rows: int, cols: int, side: int, size: list[int]) -> torch.Tensor:
    """[1, H, W]: per-token values of an image's ``rows x cols`` anyres tiles (each ``side x side``, row-major)
    stitched into one grid and unpadded to the image's aspect as the model does with its features."""
    grid = torch.stack(tiles).view(rows, cols, side, side).permute(0, 2, 1, 3)
    return unpad_image(grid.reshape(1, rows * side, cols * side), torch.tensor(size))
