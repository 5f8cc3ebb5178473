"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens per image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

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

    @contextlib.contextmanager
    def capture_context(self) -> Iterator[None]:
        """transformers' ``get_placeholder_mask`` checks the image-token count with a message f-string that formats
        a device tensor (a host read, even with the check disabled): during a capture the mask is computed
        without it (the eager first call of the signature ran the check)."""
        base = self.base
        image_token = self.model.config.image_token_id

        def placeholder_mask(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features: Any
                             ) -> torch.Tensor:
            if input_ids is None:  # embeddings passed in: transformers' own path (it compares embeddings)
                return original(input_ids, inputs_embeds, image_features)
            return (input_ids == image_token).unsqueeze(-1).to(inputs_embeds.device)

        original = base.get_placeholder_mask
        base.get_placeholder_mask = placeholder_mask  # an instance attribute shadowing the method
        try:
            yield
        finally:
            del base.get_placeholder_mask
