"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP tower
(no CLS token) and a Qwen2 decoder, with two differences in how an image's tokens are laid out:

* anyres_max_N (``config.vision_aspect_ratio``, "anyres_max_9" in the released models): when the unpadded grid
  of an image's anyres tiles holds more than 1.1² x N tiles' worth of patches, the model bilinearly interpolates
  its features down by ``ratio = sqrt(h * w / (N * side²))`` to ``(int(h // ratio), int(w // ratio))``, then
  closes every row with ``image_newline``. The tokens of such a grid are not patches any more: scores from the
  tower are interpolated the same way (:meth:`LlavaOnevisionAdapter.image_tokens`).
* multi-image prompts (``batch_num_images`` > 1 for the sample): each image is its base tile only, followed by
  one ``image_newline`` (trailing layout), as the processor and ``get_image_features`` do.

Videos (``pixel_values_videos``: pooled frames, one newline per video) are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from mmeff.errors import ImageTokenMismatchError, UnsupportedModelError
from mmeff.families.base import ImageSpan, Tile
from mmeff.families.llava_next import LlavaNextAdapter, stitch_tiles


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    span_inputs = ("image_sizes", "batch_num_images")
    host_inputs = ("image_sizes", "batch_num_images")  # tiles are chosen on the host from them
    vision_prefix = 0  # SigLIP: no CLS token
    # generate (transformers >= 5.2x) passes the pre-encoded SigLIP output, whose ``pooler_output`` key is set after
    # construction: its key order does not survive the whole-forward graph's input copy, so only the decoder is
    # graphed (under generate the tower runs outside the forward anyway)
    graph_whole_forward = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        if cfg.vision_config.model_type != "siglip_vision_model" or cfg.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                "llava_onevision: mmeff supports the released layout only (a SigLIP vision tower with "
                f"vision_feature_select_strategy='full'); got a {cfg.vision_config.model_type} tower with "
                f"{cfg.vision_feature_select_strategy!r}")

    def _max_tiles(self) -> int:
        """N of ``anyres_max_N``."""
        return int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def _patched(self, inputs: dict[str, Any], n_images: int) -> list[bool]:
        """Per image: whether it is split into anyres tiles (the model's ``need_patching``): images of
        multi-image samples are not; without ``batch_num_images`` every image is (the model's fallback)."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * n_images
        counts = torch.as_tensor(counts).tolist()
        return [n == 1 for n in counts for _ in range(n)]

    def _anyres(self, size: list[int]) -> tuple[int, int, int, int, tuple[int, int] | None]:
        """(tile rows, tile cols, unpadded h, unpadded w, interpolated (h, w) or None) of a patched image."""
        cfg = self.model.config
        side = self._side()
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        # the unpadded grid's shape, computed by the same function the model applies to its features
        h, w = unpad_image(torch.empty(1, rows * side, cols * side), torch.tensor(size)).shape[1:]
        h, w = int(h), int(w)
        ratio = math.sqrt(h * w / (self._max_tiles() * side**2))
        return rows, cols, h, w, ((int(h // ratio), int(w // ratio)) if ratio > 1.1 else None)

    def image_layouts(self, inputs: dict[str, Any], n_images: int) -> list[tuple[tuple[Tile, ...], int]]:
        side = self._side()
        base = Tile(0, side, side)
        out = []
        patched = self._patched(inputs, n_images)
        for i, size in enumerate(inputs["image_sizes"][:n_images]):
            if not patched[i]:
                out.append(((base,), 1))  # the base tile, then one newline
                continue
            _, _, h, w, scaled = self._anyres(torch.as_tensor(size).tolist())
            h, w = scaled or (h, w)
            out.append(((base, Tile(base.length, h, w, newline=True)), 0))
        return out

    def spans(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> list[list[ImageSpan]]:
        video = getattr(self.model.config, "video_token_id", None)
        if inputs.get("pixel_values_videos") is not None or (
                video is not None and bool((input_ids == int(video)).any())):
            raise ImageTokenMismatchError(
                "llava_onevision: video input (pixel_values_videos / <video> tokens) is not supported by mmeff; "
                "pass the frames as images, or run the model unwrapped")
        return super().spans(input_ids, inputs)

    def image_tokens(self, units: list[torch.Tensor], spans: list[ImageSpan], inputs: dict[str, Any]
                     ) -> list[torch.Tensor] | None:
        """Each image is its base tile, then (anyres images) its tiles stitched into one grid and unpadded as
        the model lays out their features — bilinearly interpolated like the features where anyres_max shrinks
        the grid (newlines are layout, not scored). Images of multi-image samples are their base tile."""
        out: list[torch.Tensor] = []
        pos = 0
        for sp in spans:
            if len(sp.tiles) == 1:  # not patched: one unit
                if pos >= len(units):
                    return None
                out.append(units[pos])
                pos += 1
                continue
            size = torch.as_tensor(inputs["image_sizes"][sp.image_index]).tolist()
            rows, cols, _, _, scaled = self._anyres(size)
            tiles = units[pos : pos + 1 + rows * cols]
            pos += 1 + rows * cols
            if len(tiles) != 1 + rows * cols:
                return None
            grid = stitch_tiles(tiles[1:], rows, cols, sp.tiles[0].rows, size)
            if scaled is not None:
                grid = nn.functional.interpolate(grid[None].float(), list(scaled), mode="bilinear")[0].to(grid.dtype)
            out.append(torch.cat([tiles[0], grid[0].flatten()]))
        return out if pos == len(units) else None
