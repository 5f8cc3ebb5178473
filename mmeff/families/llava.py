"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens per image."""

from __future__ import annotations

from typing import Any

from mmeff.families.base import Adapter, Tile


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def _side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _per_image(self) -> tuple[tuple[Tile, ...], int]:
        side = self._side()
        if self.model.config.vision_feature_select_strategy == "full":  # the CLS token leads, as layout
            return (Tile(1, side, side),), 1
        return (Tile(0, side, side),), 0

    def _count_images(self, inputs: dict[str, Any], per_sample_runs: list[list[tuple[int, int]]]) -> int:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            return int(pixel_values.shape[0])
        tiles, extra = self._per_image()
        return sum(length for r in per_sample_runs for _, length in r) // (tiles[0].length + extra)

    def image_layouts(self, inputs: dict[str, Any], n_images: int) -> list[tuple[tuple[Tile, ...], int]]:
        return [self._per_image()] * n_images
