"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's image layout (dynamic-resolution frames of merged
tokens between ``<|vision_start|>`` / ``<|vision_end|>``; a tower of packed patches without CLS) with two
differences that matter to mmeff:

* M-RoPE is interleaved over the rotary frequencies and videos carry timestamps (each frame is its own
  ``<|vision_start|>`` run, ``get_rope_index`` splits ``video_grid_thw`` per frame). Both live inside the model's
  own position ids and rotary embedding, which mmeff gathers along the sequence like any other; generate passes
  4 rows (text positions first), which :meth:`Qwen2VLAdapter.decode_position_ids` already drops.
* DeepStack: the tower's ``deepstack_visual_indexes`` blocks give extra merged features that the text model adds
  to the outputs of decoder layers ``0 .. k-1`` at the visual positions (``Qwen3VLTextModel._deepstack_process``
  with ``visual_pos_masks`` [B, N] and the features [visual tokens, D] in row-major order). When the pipeline has
  removed tokens (input stage or an earlier layer), the layer's output holds only its group's slots: the
  additions must follow the same selection. :meth:`Qwen3VLAdapter.instance_patches` shadows the text model's
  ``_deepstack_process`` while attached with a version that places the features in original coordinates and
  gathers them (and the mask) to the current group's slots; fill slots get none. It uses gathers only (the
  original's boolean indexing reads a count back), so a prefill's decoder can be captured in a CUDA graph. A
  token removed before layer ``l`` never gets the additions after ``l`` — it is no longer computed; a kept token
  gets exactly its own.

Videos: each frame (its own ``<|vision_start|>`` run after a timestamp) is one span of one tile; mixing images and
videos in one batch is refused (as for Qwen2-VL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision as _rotary_3

from mmeff.errors import MmeffError
from mmeff.families.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    _rotary = staticmethod(_rotary_3)

    def _grids(self, inputs: dict[str, Any]) -> list[list[int]]:
        """As Qwen2-VL, but a video's frames are separate spans: the processor writes each frame as its own
        ``<|vision_start|>`` run after its timestamp text (as ``get_rope_index`` splits ``video_grid_thw``)."""
        video = inputs.get("video_grid_thw")
        if video is None:
            return super()._grids(inputs)
        if inputs.get("image_grid_thw") is video:  # recorded: get_video_features calls get_image_features
            inputs = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
        return [[1, h, w] for t, h, w in super()._grids(inputs) for _ in range(t)]

    def deepstack_layers(self) -> int:
        """How many of the first decoder layers get DeepStack features added to their outputs."""
        return len(self.vision_tower.config.deepstack_visual_indexes)

    def instance_patches(self, host: Any) -> list[tuple[Any, str, Callable[..., Any]]]:
        text = self.language_model
        original = text._deepstack_process

        def deepstack(hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
                      ) -> torch.Tensor:
            st = host.state
            if st is None or st.phase != "prefill" or visual_embeds.shape[0] == 0:
                return original(hidden, visual_pos_masks, visual_embeds)
            mask = visual_pos_masks.to(hidden.device)
            embeds = visual_embeds.to(hidden.device, hidden.dtype)
            # the features in original coordinates by each position's visual ordinal (a gather: transformers'
            # boolean indexing reads the count back, which a captured prefill may not)
            ordinal = (mask.flatten().cumsum(0) - 1).clamp_min(0)
            full = embeds.index_select(0, ordinal).view(*mask.shape, embeds.shape[-1])
            if hidden.shape[1] != mask.shape[1]:  # tokens removed: follow the current group's slots
                g = st.group
                if g.index.shape[1] != hidden.shape[1]:
                    raise MmeffError(f"qwen3_vl: DeepStack step on {hidden.shape[1]} tokens but the current group "
                                     f"holds {g.index.shape[1]} (unexpected call order)")
                mask = torch.gather(mask, 1, g.index) & g.valid
                full = torch.gather(full, 1, g.index[..., None].expand(-1, -1, full.shape[-1]))
            # what the original computes (hidden + features at the visual positions), sum for sum
            return torch.where(mask[..., None], hidden + full, hidden)

        return [(text, "_deepstack_process", deepstack)]
