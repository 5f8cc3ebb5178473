"""VFlowOpt (Yang et al., ICCV 2025; code sihany077/VFlowOpt): importance map, recycling, progressive pruning.

Importance of each visual token (computed inside the vision tower, per *unit*: a CLIP tile or a Qwen image):

    s = context_relevance(vision layer ``vision_layer``; global tokens by the t * mean rule)
        + alpha_v * softmax(entropy of the token's pixel region over the unit)

Input stage (before decoder layer 0), per image: of its N non-layout tokens the lowest
``round(N (1 - r_v)) + int(N / m^2)`` are taken out; those are grouped into m x m spatial cells
(``floor(row / m), floor(col / m)`` per tile) and each cell becomes one token, the score-weighted mean of its
members, written at the slot of its highest-scoring member. Before each decoder layer ``llm_layers[i]`` the
lowest ``round(n (1 - llm_ratios[i]))`` of the n remaining tokens of each image are dropped by the same score.
Layout tokens (LLaVA-NeXT newlines) are never touched; kept tokens keep their original position ids.

Family equivalents (see docs/vflowopt.md): CLIP towers keep the CLS token in the attention (as a query and a
possible global token) and drop its column from the map; LLaVA-NeXT scores each tile (base and anyres) on its
own and lays the anyres tiles out, unpadded, exactly as the model lays out their features; Qwen2-VL /
Qwen2.5-VL score patches in the tower's block-diagonal (window / frame) attention, undo Qwen2.5-VL's window
order, and sum the 2x2 patches of each merged token; a token's pixel region is its 2x2 patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmeff.config import MethodConfig, register_method
from mmeff.engine.method import Method, Point
from mmeff.engine.state import State
from mmeff.errors import ConfigError, MmeffError
from mmeff.kernels.vflowopt_score import context_relevance, grey_levels, patch_entropy
from mmeff.methods.vflowopt.budget import effective_r_v, effective_schedule, kept_fraction

# OpenAI CLIP normalisation: what the LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL image processors use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VFlowOptConfig(MethodConfig):
    """Defaults: the released 10%-kept config (Qwen2 decoder, 28 layers, stages before layers 9 and 18)."""

    method = "vflowopt"
    vision_layer: int = -2  # vision encoder layer whose attention gives the context relevance (negative: from end)
    t: float = 39.26492840997221  # global tokens: received attention above t times the mean
    m: float = 17.386981849158786  # recycling cell side, in tokens (may be fractional, as in the official code)
    r_v: float = 0.11661529508161146  # share of each image's tokens kept at the input stage
    alpha_v: float = 0.0  # weight of the softmaxed patch entropy
    llm_layers: tuple[int, ...] = (9, 18)  # decoder layers before which tokens are dropped again
    llm_ratios: tuple[float, ...] = (1.0, 0.6011)  # share of the remaining tokens each stage keeps
    layers_of: int = 28  # decoder depth llm_layers are written for (scaled to the model's depth); 0: absolute
    budget: float | None = None  # if set: the last ratio is solved so the averaged budget equals this
    recycle: bool = True  # False (ablation): drop the lowest tokens outright, keeping the top round(N r_v)
    pixel_mean: tuple[float, ...] = CLIP_MEAN  # image processor normalisation, to recover the grey levels
    pixel_std: tuple[float, ...] = CLIP_STD


# -- importance map ------------------------------------------------------------------------------------------
def _unnormalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[..., 3, P] normalised pixels -> [0, 1] (per channel)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device)[:, None]
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device)[:, None]
    return pixels.float() * s + m


def clip_tile_entropy(pixels: torch.Tensor, patch: int, mean: tuple, std: tuple) -> torch.Tensor:
    """[n, 3, H, W] normalised tiles -> [n, (H/patch) * (W/patch)] entropy of each patch, row-major."""
    n, c = pixels.shape[:2]
    x = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # n, c, nh, nw, p, p
    x = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, patch * patch)
    ent = patch_entropy(grey_levels(_unnormalise(x, mean, std)))
    return ent.view(n, -1)


def qwen_token_entropy(pixel_values: torch.Tensor, channels: int, temporal: int, merge: int, mean: tuple,
                       std: tuple) -> torch.Tensor:
    """[N, C*tp*p*p] flattened Qwen patches -> [N / merge^2] entropy of each merged token's pixel region
    (its merge x merge patches, first temporal slice)."""
    n = pixel_values.shape[0]
    x = pixel_values.view(n, channels, temporal, -1)[:, :, 0]  # N, C, p*p
    unit = merge * merge
    x = x.view(n // unit, unit, channels, -1).permute(0, 2, 1, 3).reshape(n // unit, channels, -1)
    return patch_entropy(grey_levels(_unnormalise(x, mean, std)))


def combine(attn: torch.Tensor, entropy: torch.Tensor, alpha_v: float) -> torch.Tensor:
    """Importance of a unit's tokens: context relevance + alpha_v * softmax(entropy over the unit)."""
    return attn.float() + alpha_v * torch.softmax(entropy.float(), dim=-1)


def rank_in_group(scores: torch.Tensor, group: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[T] ascending rank of each score within its group (ties: the earlier element), in one pass for all
    groups; ``counts[g]`` = number of elements of group g (ids 0..len(counts)-1)."""
    order = torch.sort(scores, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then ascending score, then index
    start = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group[order]]
    return rank


def recycle_plan(scores: torch.Tensor, unit: torch.Tensor, cell: torch.Tensor, counts: list[int], r_v: float,
                 m: float, recycle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-stage decision for the packed non-layout tokens of several images at once (no host sync).

    ``scores``/``unit``/``cell``: [T] — importance, image index (each image's tokens contiguous, images in
    order, ``counts`` tokens each) and recycling cell id (distinct per (image, tile, floor(row/m),
    floor(col/m)), see :func:`cell_ids`). Per image of N tokens the ``round(N (1 - r_v)) + int(N / m^2)`` lowest
    (ties: the earlier token) leave; those of one cell merge into its highest-scoring member (ties: the
    earlier), which stays. Returns (kept [T] bool, rep [T] long: the packed index of the token's cell
    representative for every recycled token, -1 otherwise). ``recycle=False`` (ablation) drops the
    ``round(N (1 - r_v))`` lowest and recycles nothing.
    """
    dev, total = scores.device, scores.numel()
    n_low = [min(n, round(n * (1.0 - r_v)) + int(n / (m * m))) if recycle else round(n * (1.0 - r_v))
             for n in counts]
    low = rank_in_group(scores, unit, torch.tensor(counts, device=dev)) < torch.tensor(n_low, device=dev)[unit]
    rep = torch.full_like(unit, -1)
    if not recycle:
        return ~low, rep
    idx = torch.arange(total, device=dev)
    n_cells = total  # cell ids are < total (at most one cell per token)
    best = torch.full((n_cells,), float("-inf"), device=dev)
    best = best.scatter_reduce(0, cell, torch.where(low, scores.float(), float("-inf")), "amax")
    first = torch.full((n_cells,), total, device=dev).scatter_reduce(
        0, cell, torch.where(low & (scores.float() == best[cell]), idx, total), "amin")
    rep = torch.where(low, first[cell], -1)
    return ~low | (rep == idx), rep


def cell_ids(unit: torch.Tensor, tile: torch.Tensor, row: torch.Tensor, col: torch.Tensor, m: float) -> torch.Tensor:
    """[T] dense id of each token's recycling cell (image, tile, floor(row / m), floor(col / m))."""
    parts = [unit, tile, torch.floor(row / m).long(), torch.floor(col / m).long()]
    key = parts[0]
    for x in parts[1:]:  # one integer key (mixed radix): 1-D unique is far cheaper than unique(dim=0)
        key = key * (int(x.max()) + 1 if x.numel() else 1) + x
    return torch.unique(key, return_inverse=True)[1]


def merge_cells(x: torch.Tensor, scores: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """[T, d] tokens with each cell's score-weighted mean written at its representative (weights normalised
    to sum 1, as the official code; a zero or non-finite weight sum falls back to the plain mean)."""
    member = rep >= 0
    tgt = rep.clamp_min(0)
    w = torch.where(member, scores.float(), 0.0)
    total = torch.zeros(len(x), device=x.device).index_add_(0, tgt, w)
    count = torch.zeros(len(x), device=x.device).index_add_(0, tgt, member.float())
    ok = torch.isfinite(total) & (total != 0)
    w = torch.where(ok[tgt], w / torch.where(ok, total, 1.0)[tgt], 1.0 / count[tgt].clamp_min(1.0)) * member
    merged = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tgt, w[:, None] * x.float())
    is_rep = member & (rep == torch.arange(len(x), device=x.device))
    return torch.where(is_rep[:, None], merged.to(x.dtype), x)


class VFlowOpt(Method):
    points = frozenset({Point.INPUT, Point.LAYER})
    graphable = True

    config: VFlowOptConfig

    def __init__(self, config: VFlowOptConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.layers: tuple[int, ...] = ()
        self.ratios: tuple[float, ...] = ()
        self._units: list[torch.Tensor] = []  # importance per vision unit, in encoder order, until the input stage
        self._entropy: list[torch.Tensor] | None = None
        self._tower_inputs: dict[str, Any] = {}
        self._inputs: dict[str, Any] = {}

    # -- set-up -------------------------------------------------------------------------------------------
    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 0.0 < effective_r_v(c) <= 1.0:
            raise ConfigError(f"vflowopt: r_v must be in (0, 1], got {effective_r_v(c)}")
        if not c.m >= 1.0:
            raise ConfigError(f"vflowopt: m (cell side in tokens) must be >= 1, got {c.m}")
        if c.t < 0:
            raise ConfigError(f"vflowopt: t must be >= 0, got {c.t}")
        if any(not 0.0 <= r <= 1.0 for r in c.llm_ratios):
            raise ConfigError(f"vflowopt: llm_ratios must lie in [0, 1], got {list(c.llm_ratios)}")
        if c.budget is not None and not 0.0 <= c.budget < 1.0:
            raise ConfigError(f"vflowopt: budget must be in [0, 1), got {c.budget}")
        if len(c.pixel_mean) != 3 or len(c.pixel_std) != 3:
            raise ConfigError("vflowopt: pixel_mean and pixel_std need 3 values (RGB)")
        n_vision = len(self.adapter.vision_layers())
        if not -n_vision <= c.vision_layer < n_vision:
            raise ConfigError(f"vflowopt: vision_layer {c.vision_layer} outside the {n_vision}-layer vision tower")
        self.layers, self.ratios = effective_schedule(c, n_layers)

    @property
    def r_v(self) -> float:
        return effective_r_v(self.config)

    def attach(self, pipeline: Any) -> None:
        tower = self.adapter.vision_tower
        layer = self.adapter.vision_layers()[self.config.vision_layer]
        attn = self.adapter.vision_attention(layer)
        pipeline.add_hook(tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True))
        pipeline.add_hook(attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True))

    @property
    def _qwen(self) -> bool:
        return self.adapter.family in ("qwen2_vl", "qwen2_5_vl")

    # -- vision tower hooks -------------------------------------------------------------------------------
    def _tower_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        c = self.config
        if self._qwen:
            pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
            grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
            vc = module.config
            ent = qwen_token_entropy(pixels, vc.in_channels, vc.temporal_patch_size, vc.spatial_merge_size,
                                     c.pixel_mean, c.pixel_std)
            counts = (grid.prod(-1) // vc.spatial_merge_size**2).tolist()
            self._entropy = list(ent.split(counts))
            self._tower_inputs = {"grid_thw": grid}
        else:
            pixels = args[0] if args else kwargs["pixel_values"]
            patch = self.adapter.model.config.vision_config.patch_size
            self._entropy = list(clip_tile_entropy(pixels, patch, c.pixel_mean, c.pixel_std).unbind(0))

    def _attn_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._entropy is None:
            raise MmeffError("vflowopt: the vision layer ran without its tower's pre-hook (unexpected call order)")
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            attn = self._qwen_relevance(module, hidden, kwargs) if self._qwen else self._clip_relevance(module, hidden)
        self._units.extend(combine(a, e, self.config.alpha_v) for a, e in zip(attn, self._entropy, strict=True))
        self._entropy = None

    def _clip_relevance(self, module: torch.nn.Module, hidden: torch.Tensor) -> list[torch.Tensor]:
        n, s, _ = hidden.shape
        heads = module.num_heads
        q = module.q_proj(hidden).view(n * s, heads, -1).transpose(0, 1)
        k = module.k_proj(hidden).view(n * s, heads, -1).transpose(0, 1)
        ids = torch.arange(n, device=hidden.device).repeat_interleave(s)
        rel = context_relevance(q, k, module.scale, ids, ids, self.config.t, n).view(n, s)
        n_patches = self._entropy[0].shape[0]
        return list(rel[:, s - n_patches :].unbind(0))  # CLS (if any) leads: drop its column

    def _qwen_relevance(self, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        cu = kwargs["cu_seqlens"].long()
        block = torch.arange(cu.numel() - 1, device=hidden.device).repeat_interleave(cu.diff())
        grid = self._tower_inputs["grid_thw"]
        vc = self.adapter.vision_tower.config
        unit = vc.spatial_merge_size**2
        sizes = grid.prod(-1).to(hidden.device)
        image = torch.arange(sizes.numel(), device=hidden.device).repeat_interleave(sizes)
        rel = context_relevance(q.transpose(0, 1), k.transpose(0, 1), module.scaling, block, image, self.config.t,
                                sizes.numel())
        if getattr(vc, "window_size", None) and hasattr(self.adapter.vision_tower, "fullatt_block_indexes"):
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
            ordered = torch.empty_like(rel.view(-1, unit))
            ordered[window_index.to(rel.device)] = rel.view(-1, unit)  # internal slot i holds unit window_index[i]
            rel = ordered.flatten()
        tokens = rel.view(-1, unit).sum(1)
        return list(tokens.split((sizes // unit).tolist()))

    # -- decoder ------------------------------------------------------------------------------------------
    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        self._inputs = {k: inputs.get(k) for k in ("image_sizes",)}

    def image_scores(self, state: State) -> list[torch.Tensor]:
        """Importance of every image's tokens in span order (grid cells row-major, layout tokens excluded)."""
        units, self._units = self._units, []
        spans = sorted((sp for sample in state.spans for sp in sample), key=lambda sp: sp.image_index)
        out: list[torch.Tensor] = []
        pos = 0
        for sp in spans:
            if self.adapter.family == "llava_next":
                from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

                cfg = self.adapter.model.config
                size = torch.as_tensor(self._inputs["image_sizes"][sp.image_index]).tolist()
                rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                need = 1 + rows * cols
                tiles = units[pos : pos + need]
                pos += need
                if len(tiles) != need:
                    break
                side = sp.tiles[0].rows
                grid = torch.stack(tiles[1:]).view(rows, cols, side, side).permute(0, 2, 1, 3)
                grid = unpad_image(grid.reshape(1, rows * side, cols * side), torch.tensor(size))[0]
                out.append(torch.cat([tiles[0], grid.flatten()]))
            else:
                if pos >= len(units):
                    break
                out.append(units[pos])
                pos += 1
            n_tok = sum(t.rows * t.cols for t in sp.tiles)
            if out[-1].numel() != n_tok:
                raise MmeffError(
                    f"vflowopt: image {sp.image_index} has {n_tok} visual tokens but its importance map has "
                    f"{out[-1].numel()} entries (vision layer {self.config.vision_layer})"
                )
        if len(out) != len(spans) or pos != len(units):
            raise MmeffError(
                f"vflowopt: {len(spans)} image(s) in the prompt but the vision tower produced {len(units)} scored "
                "unit(s) in this forward; the images must be encoded by this call (pixel_values, not inputs_embeds)"
            )
        return out

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> Any:
        if layer == 0:
            return self._input_stage(state, hidden)
        if layer in self.layers:
            return self._llm_stage(state, self.ratios[self.layers.index(layer)])
        return None

    def _input_stage(self, state: State, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not any(state.spans):  # host data: no sync
            self._units = []
            return None
        scores = self.image_scores(state)
        dev = hidden.device
        # packed layout of every image's non-layout tokens (host side: spans are host data)
        b_of, pos, unit, tile, row, col, span_of, counts = [], [], [], [], [], [], [], []
        span_map = torch.full(state.visual.shape, -1, dtype=torch.long)  # original position -> span number
        for b, sample in enumerate(state.spans):
            for sp in sample:
                g = sp.grid()
                cand = (~g["layout"]).nonzero().flatten()
                counts.append(cand.numel())
                b_of.append(torch.full_like(cand, b))
                pos.append(sp.start + cand)
                unit.append(torch.full_like(cand, len(counts) - 1))
                tile.append(g["tile"][cand])
                row.append(g["row"][cand])
                col.append(g["col"][cand])
                span_of.append(sp.image_index)
                span_map[b, sp.start + cand] = len(counts) - 1
        b_of, pos, unit = torch.cat(b_of).to(dev), torch.cat(pos).to(dev), torch.cat(unit)
        cell = cell_ids(unit, torch.cat(tile), torch.cat(row), torch.cat(col), self.config.m).to(dev)
        s = torch.cat([scores[i].to(dev) for i in span_of])
        kept, rep = recycle_plan(s, unit.to(dev), cell, counts, self.r_v, self.config.m, self.config.recycle)
        full = torch.full(state.visual.shape, float("-inf"), device=dev)
        full[b_of, pos] = s.float()
        keep = torch.ones(state.visual.shape, dtype=torch.bool, device=dev)
        keep[b_of, pos] = kept
        new_hidden = hidden.clone()
        new_hidden[b_of, pos] = merge_cells(hidden[b_of, pos], s, rep)
        state.scratch["vflowopt"] = full
        state.scratch["vflowopt_span"] = (span_map.to(dev), len(counts))
        return keep, new_hidden

    def _llm_stage(self, state: State, ratio: float) -> torch.Tensor | None:
        """Per image, drop the ``round(n (1 - ratio))`` lowest of its n prunable slots (ties: the earlier)."""
        if ratio >= 1.0 or "vflowopt_span" not in state.scratch:  # nothing to drop: decided on the host, no sync
            return None
        g = state.group
        span_map, n_spans = state.scratch["vflowopt_span"]
        scores = torch.gather(state.scratch["vflowopt"], 1, g.index).flatten()
        span = torch.gather(span_map, 1, g.index)
        span = torch.where(state.prunable_in_group(g) & (span >= 0), span, n_spans).flatten()  # n_spans: not prunable
        count = torch.zeros(n_spans + 1, dtype=torch.long, device=span.device)
        count.index_add_(0, span, torch.ones_like(span))  # not bincount: that reads the max back (a sync)
        n_drop = torch.round(count.double() * (1.0 - ratio)).long()
        n_drop[n_spans] = 0
        keep = (rank_in_group(scores, span, count) >= n_drop[span]).view(g.index.shape)
        return None if bool(keep.all()) else keep


register_method(VFlowOptConfig, VFlowOpt)

__all__ = ["VFlowOpt", "VFlowOptConfig", "averaged_kept", "cell_ids", "effective_schedule", "merge_cells",
           "recycle_plan"]


def averaged_kept(config: VFlowOptConfig, n_layers: int) -> float:
    """Nominal visual-token share kept, averaged over the decoder layers (recycled cells not counted)."""
    layers, ratios = effective_schedule(config, n_layers)
    return kept_fraction(effective_r_v(config), layers, ratios, n_layers)



