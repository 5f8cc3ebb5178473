"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images (and video frames) between ``<|vision_start|>`` and
``<|vision_end|>``; each frame is an (h/m) x (w/m) grid of merged tokens (m = spatial merge size) and the text
decoder uses 3-D M-RoPE position ids, which mmeff gathers row by row like any other position ids."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmeff.errors import ImageTokenMismatchError
from mmeff.families.base import Adapter, Tile


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    span_inputs = ("image_grid_thw", "video_grid_thw")
    has_cls_token = False

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.visual

    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        cfg = self.model.config
        return tuple(int(i) for i in (cfg.image_token_id, cfg.video_token_id) if i is not None)

    def _grids(self, inputs: dict[str, Any]) -> list[list[int]]:
        # images and videos in prompt order is only guaranteed when a prompt uses one kind: refuse mixing
        grids = []
        for key in ("image_grid_thw", "video_grid_thw"):
            if inputs.get(key) is not None:
                grids.append(torch.as_tensor(inputs[key]).tolist())
        if len(grids) > 1:
            raise ImageTokenMismatchError("qwen2_vl: mixing images and videos in one batch is not supported by mmeff")
        return grids[0] if grids else []

    def _count_images(self, inputs: dict[str, Any], per_sample_runs: list[list[tuple[int, int]]]) -> int:
        return len(self._grids(inputs))

    def image_layouts(self, inputs: dict[str, Any], n_images: int) -> list[tuple[tuple[Tile, ...], int]]:
        merge = self.model.config.vision_config.spatial_merge_size
        out = []
        for t, h, w in self._grids(inputs):
            rows, cols = h // merge, w // merge
            out.append((tuple(Tile(i * rows * cols, rows, cols) for i in range(t)), 0))
        return out


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
