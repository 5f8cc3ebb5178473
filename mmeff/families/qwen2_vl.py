"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images (and video frames) between ``<|vision_start|>`` and
``<|vision_end|>``; each frame is an (h/m) x (w/m) grid of merged tokens (m = spatial merge size) and the text
decoder uses 3-D M-RoPE position ids, which mmeff gathers row by row like any other position ids."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision as _rotary_2_5,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision as _rotary_2
from transformers.vision_utils import get_vision_window_index

from mmeff.errors import ImageTokenMismatchError, MmeffError
from mmeff.families.base import Adapter, Tile, VisionCall, text_positions


@dataclass
class UnitDrop:
    """Merge units kept after one tower block by a vision-side stage (``mmeff.methods.vflowopt.vit``, ours): what
    the later blocks and the merger run on. A merge unit is the m x m patch group the PatchMerger turns into one
    LLM token; in the packed tower sequence its patches are m*m consecutive positions."""

    index: torch.Tensor  # [S'] packed patch positions kept (whole units, in tower order)
    units: torch.Tensor  # [U'] kept merged tokens (indices into the tower's full merged output)
    n_units: int  # merged tokens of the full output (what the merger's output is scattered back to)
    block_kwargs: dict[str, Any]  # the later blocks' cu_seqlens / max_seqlen / rotary, over the kept positions


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    span_inputs = ("image_grid_thw", "video_grid_thw")
    graph_whole_forward = False  # the tower splits by host lengths and M-RoPE positions are built on the host
    vision_prefix = 0  # no CLS token
    mrope = True
    windowed = False  # Qwen2.5-VL: the tower runs its merged tokens in window order
    _rotary = staticmethod(_rotary_2)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.visual

    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def feature_layer(self) -> int | None:
        """The merger reads the last block's output."""
        return len(self.vision_layers()) - 1

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


    # -- the vision tower ---------------------------------------------------------------------------------------
    def vision_call(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                    tower_args: tuple, tower_kwargs: dict[str, Any]) -> VisionCall:
        hidden = args[0] if args else kwargs["hidden_states"]
        pixels = tower_args[0] if tower_args else tower_kwargs.get("hidden_states", tower_kwargs.get("pixel_values"))
        grid = tower_args[1] if len(tower_args) > 1 else tower_kwargs["grid_thw"]
        return VisionCall(layer, module, hidden, kwargs, pixels, grid, self)

    def vision_qk(self, call: VisionCall) -> tuple[torch.Tensor, torch.Tensor, float]:
        """q/k of the packed patches (rotary applied, as the block computes them): [H, S, D]."""
        module, hidden = call.module, call.hidden
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rotary(q, k, *call.kwargs["position_embeddings"])
        return q.transpose(0, 1), k.transpose(0, 1), module.scaling

    def vision_segments(self, call: VisionCall) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Blocks from the layer's ``cu_seqlens`` (frames, or windows in Qwen2.5-VL's windowed layers); units are
        images (their patches counted from ``grid_thw``)."""
        dev = call.hidden.device
        cu = call.kwargs["cu_seqlens"].long()
        block = torch.arange(cu.numel() - 1, device=dev).repeat_interleave(cu.diff())
        sizes = call.grid.prod(-1).to(dev)
        unit = torch.arange(sizes.numel(), device=dev).repeat_interleave(sizes)
        return block, unit, sizes.numel()

    def unit_tokens(self, call: VisionCall, scores: torch.Tensor, reduce: str = "sum") -> list[torch.Tensor]:
        """A merged LLM token is merge x merge patches: their scores are summed (``reduce="sum"``) or averaged
        (``"mean"``), in image order (Qwen2.5-VL's window order undone)."""
        vc = self.vision_tower.config
        unit = vc.spatial_merge_size**2
        per_token = scores.view(-1, unit)
        if self.windowed:  # internal slot i holds merged token window_index[i]
            window_index, _ = get_vision_window_index(call.grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
            ordered = torch.empty_like(per_token)
            ordered[window_index.to(per_token.device)] = per_token
            per_token = ordered
        tokens = per_token.sum(1) if reduce == "sum" else per_token.mean(1)
        return list(tokens.split((call.grid.prod(-1) // unit).tolist()))

    def token_regions(self, pixels: torch.Tensor, grid: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """A merged token's region is its merge x merge patches (first temporal slice of each), [T, C, m*m*p*p]."""
        vc = self.vision_tower.config
        channels, temporal, merge = vc.in_channels, vc.temporal_patch_size, vc.spatial_merge_size
        n = pixels.shape[0]
        x = pixels.view(n, channels, temporal, -1)[:, :, 0]  # N, C, p*p
        unit = merge * merge
        x = x.view(n // unit, unit, channels, -1).permute(0, 2, 1, 3).reshape(n // unit, channels, -1)
        return x, (grid.prod(-1) // unit).tolist()

    # -- decoder positions: M-RoPE ---------------------------------------------------------------------------
    def prefill_position_ids(self, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor | None:
        if inputs.get("pixel_values") is not None and inputs.get("image_grid_thw") is not None:
            return None  # with an image the model builds its own M-RoPE positions (and rope_deltas)
        return text_positions(mask)

    def text_position_ids(self, positions: torch.Tensor, rope_deltas: torch.Tensor | None) -> torch.Tensor:
        if rope_deltas is None:
            return positions
        # text tokens after the image share one offset in all 3 rows
        return (positions + rope_deltas.to(positions.device))[None].expand(3, -1, -1)

    def decode_position_ids(self, position_ids: torch.Tensor | None, batch: int, virtual: int,
                            device: torch.device) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.full((1, 1), virtual, dtype=torch.long, device=device)
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # text positions prepended (packed inputs)
            position_ids = position_ids[1:]
        return position_ids.expand(3, batch, 1)

    def rope_state(self) -> Any:
        return getattr(self.base, "rope_deltas", None)

    def set_rope_state(self, value: Any) -> None:
        if hasattr(self.base, "rope_deltas"):
            self.base.rope_deltas = value


    # -- a vision-side stage (ours): whole merge units dropped inside the tower after one block ------------------
    def merge_units(self, call: VisionCall) -> tuple[torch.Tensor, list[int]]:
        """([U] attention block (frame) of each merged token of the call, tower order; per block its merged-token
        count, on the host — read from ``grid_thw``, as the tower itself does)."""
        unit = self.vision_tower.config.spatial_merge_size ** 2
        counts = [h * w // unit for t, h, w in call.grid.tolist() for _ in range(t)]
        frame = torch.arange(len(counts), device=call.hidden.device).repeat_interleave(
            torch.tensor(counts, device=call.hidden.device))
        return frame, counts

    def drop_units(self, call: VisionCall, keep: torch.Tensor, kept: list[int]) -> UnitDrop:
        """What the blocks after ``call.layer`` run on when only the merged tokens ``keep`` ([U] bool, tower order)
        stay, ``kept[i]`` of them in attention block (frame) i: the kept patches (whole units), the per-frame
        ``cu_seqlens`` of the kept positions, and the rotary embeddings the tower made for the full grid gathered at
        the kept patches (each keeps its exact 2-D position)."""
        if self.windowed:
            raise MmeffError(f"{self.family}: dropping merge units inside the windowed tower is not supported")
        unit = self.vision_tower.config.spatial_merge_size ** 2
        n_units, n_kept = keep.numel(), sum(kept)
        units = torch.sort((~keep).to(torch.int8), stable=True).indices[:n_kept]  # kept, ascending: no host read
        index = (units[:, None] * unit + torch.arange(unit, device=units.device)).flatten()
        kwargs = call.kwargs
        cu = kwargs["cu_seqlens"]
        lengths = [k * unit for k in kept]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        out: dict[str, Any] = {"cu_seqlens": torch.tensor(bounds, dtype=cu.dtype, device=cu.device)}
        if kwargs.get("max_seqlen") is not None:
            old = kwargs["max_seqlen"]
            out["max_seqlen"] = torch.tensor(max(lengths), dtype=old.dtype, device=old.device) \
                if isinstance(old, torch.Tensor) else max(lengths)
        for key in ("position_embeddings", "rotary_pos_emb"):
            value = kwargs.get(key)
            if isinstance(value, tuple):
                out[key] = tuple(v.index_select(0, index.to(v.device)) for v in value)
            elif isinstance(value, torch.Tensor):
                out[key] = value.index_select(0, index.to(value.device))
        return UnitDrop(index, units, n_units, out)

    def instance_patches(self, host: Any) -> list[tuple[Any, str, Any]]:
        """For a vision-side stage among the host's methods (``drops_vision_units``; ours): block ``vit_block``
        returns only the kept units' positions, the later blocks get the kept positions' ``cu_seqlens`` and
        rotary embeddings, and the merger runs on the kept units and scatters them back into the full [U, D]
        output (zeros at the dropped units, which the stage's input-stage selection then removes). While the
        pipeline is suspended (a method's extra forward of the unwrapped model) the tower runs as it is."""
        patches = list(super().instance_patches(host))
        for stage in [m for m in getattr(host, "methods", ()) if getattr(m, "drops_vision_units", False)]:
            patches += self._unit_drop_patches(host, stage)
        return patches

    def _unit_drop_patches(self, host: Any, stage: Any) -> list[tuple[Any, str, Any]]:
        blocks, k = self.vision_layers(), stage.vit_block
        merger = self.vision_tower.merger

        def active() -> UnitDrop | None:
            return None if host.is_suspended else stage.unit_drop

        def drop_after(*args: Any, fwd: Any = blocks[k].forward, **kwargs: Any) -> Any:
            out = fwd(*args, **kwargs)
            drop = active()
            if drop is None:
                return out
            if isinstance(out, tuple):
                return (out[0].index_select(0, drop.index), *out[1:])
            return out.index_select(0, drop.index)

        def later(*args: Any, fwd: Any, **kwargs: Any) -> Any:
            drop = active()
            if drop is not None:
                kwargs.update({key: v for key, v in drop.block_kwargs.items() if key in kwargs})
            return fwd(*args, **kwargs)

        def merge(x: torch.Tensor, fwd: Any = merger.forward) -> torch.Tensor:
            drop = active()
            y = fwd(x)
            if drop is None:
                return y
            stage.unit_drop = None  # consumed: the next tower call decides again at block k
            return y.new_zeros(drop.n_units, y.shape[-1]).index_copy_(0, drop.units, y)

        patches: list[tuple[Any, str, Any]] = [(blocks[k], "forward", drop_after)]
        for blk in list(blocks)[k + 1 :]:
            patches.append((blk, "forward", functools.partial(later, fwd=blk.forward)))
        patches.append((merger, "forward", merge))
        return patches


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    windowed = True
    _rotary = staticmethod(_rotary_2_5)
