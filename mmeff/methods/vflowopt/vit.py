"""VFlowOpt's importance inside the vision tower: a vision-side stage (ours, not in the paper; issue 28).

On high-resolution Qwen2-VL the vision tower is over half of the prefill, so pruning in the decoder alone cannot
make a request much cheaper. This stage drops whole *merge units* — the m x m patch groups (m = 2) that the
PatchMerger turns into one LLM token; m*m consecutive positions of the packed tower sequence — after an early
tower block ``block``:

1. at block ``block``'s attention (its input, q/k with the tower's rotary embeddings), every merged token gets
   VFlowOpt's importance exactly as :class:`~mmeff.methods.vflowopt.method.VFlowOpt` computes it at the feature
   layer: context relevance (global tokens by the t rule, per image) summed over the unit's patches
   + alpha_v * softmax(entropy of the unit's pixels over the image);
2. per attention block of the tower (an image; a video frame) of n units the ``max(1, round(n keep))`` highest
   stay (ties: the earlier unit); block ``block`` returns only their patches, the later blocks run on them with
   the per-frame ``cu_seqlens`` of the kept positions and the rotary embeddings of the full grid gathered at the
   kept patches (each keeps its exact 2-D position), and the merger runs on the kept units; its output is
   scattered back into the full [U, D] feature tensor (zeros at dropped units) — the adapter's
   ``instance_patches`` (:meth:`mmeff.families.qwen2_vl.Qwen2VLAdapter.drop_units`);
3. the input stage (before decoder layer 0) removes exactly the dropped units' placeholder tokens; the model
   builds its M-RoPE positions for the full prompt and the pipeline gathers them, so every kept token keeps its
   exact original position. The kept counts come from the grid (host), so shapes are static.

No decoder stage follows (a design choice, docs/vflowopt.md): ``keep`` is the share of visual tokens at the LLM
input and over every decoder layer, which equals the averaged budget of the VFlowOpt preset it is matched with.

Supported: Qwen2-VL (``qwen2_vl``) only; Qwen2.5-VL's windowed tower (its window order) and every other family
are refused at ``wrap``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.method import Kept, Method, Point, register_method
from mmeff.engine.ranking import rank_in_group
from mmeff.engine.state import State
from mmeff.errors import ConfigError, MmeffError, UnsupportedModelError
from mmeff.families.base import VisionCall
from mmeff.kernels.vflowopt_score import context_relevance
from mmeff.methods.vflowopt.method import CLIP_MEAN, CLIP_STD, check_importance, combine, token_entropy

SUPPORTED = ("qwen2_vl",)


@dataclass(frozen=True)
class VFlowOptViTConfig(MethodConfig):
    """VFlowOpt's importance, scored at tower block ``block``, drops merge units inside the ViT (ours).

    ``block`` None: the last block of the tower's first quarter (``ceil(depth / 4) - 1``: block 7 of Qwen2-VL-7B's
    32, block 0 of the 4-block reference model); negative counts from the end. ``keep``: the share of each
    image's (frame's) merged tokens kept. ``t`` / ``t_rule`` / ``t_max`` / ``alpha_v`` / pixel statistics: as
    :class:`~mmeff.methods.vflowopt.method.VFlowOptConfig`.
    """

    method = "vflowopt-vit"
    block: int | None = None
    keep: float = 0.1
    t: float = 39.26492840997221
    t_rule: str = "released"
    t_max: float = 0.5
    alpha_v: float = 0.0
    pixel_mean: tuple[float, ...] = CLIP_MEAN
    pixel_std: tuple[float, ...] = CLIP_STD


def kept_units(n: int, keep: float) -> int:
    """Merged tokens a tower block (image / frame) of ``n`` keeps: ``max(1, round(n keep))``, at most n."""
    return min(n, max(1, round(n * keep)))


@dataclass
class _Data:
    keep: list[torch.Tensor] = field(default_factory=list)  # per tower call: [U] merged tokens kept (tower order)
    b_of: torch.Tensor | None = None  # [T] sample of every visual token, images in image order (tower order)
    pos: torch.Tensor | None = None  # [T] its position
    slots: list[int] = field(default_factory=list)  # per sample: prompt slots kept (host)
    units_in: int = 0
    units_kept: int = 0


class VFlowOptViT(Method):
    points = frozenset({Point.ENCODER, Point.INPUT})
    graphable = True
    Data = _Data
    drops_vision_units = True  # the Qwen2-VL adapter's instance_patches run the tower on the kept units

    config: VFlowOptViTConfig

    def __init__(self, config: VFlowOptViTConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.vit_block = 0
        self.unit_drop: Any = None  # the current tower call's UnitDrop, made at block vit_block (adapter's)
        self._pending: list[torch.Tensor] = []  # keep masks of a tower call before the prefill's state exists

    def validate(self, n_layers: int) -> None:
        c = self.config
        family = self.adapter.family
        if family not in SUPPORTED:
            why = " (its windowed tower's window order is not undone by this stage)" if family == "qwen2_5_vl" else ""
            raise UnsupportedModelError(
                f"vflowopt-vit (ours) drops merge units inside Qwen2-VL's vision tower and supports only "
                f"{', '.join(SUPPORTED)} (Qwen2VLForConditionalGeneration), not {family}{why}; "
                "use vflowopt-75 / vflowopt-90 there"
            )
        if not 0.0 < c.keep <= 1.0:
            raise ConfigError(f"vflowopt-vit: keep must be in (0, 1], got {c.keep}")
        check_importance(c, "vflowopt-vit")
        depth = len(self.adapter.vision_layers())
        block = math.ceil(depth / 4) - 1 if c.block is None else c.block
        if not -depth <= block < depth:
            raise ConfigError(f"vflowopt-vit: block {block} outside the {depth}-block vision tower")
        self.vit_block = block % depth
        self.vision_layers = (self.vit_block,)

    # -- inside the tower -----------------------------------------------------------------------------------
    def observe_vision(self, call: VisionCall, state: State | None) -> None:
        c = self.config
        q, k, scale = call.qk()
        block, unit, n_units = call.segments()
        t_max = c.t_max if c.t_rule == "bounded" else None
        rel = context_relevance(q, k, scale, block, unit, c.t, n_units, t_max)
        attn = call.unit_tokens(rel, "sum")
        if c.alpha_v:
            regions, counts = self.adapter.token_regions(call.pixels, call.grid)
            entropy = token_entropy(regions, c.pixel_mean, c.pixel_std).split(counts)
        else:
            entropy = [torch.zeros_like(a) for a in attn]
        scores = torch.cat([combine(a, e, c.alpha_v) for a, e in zip(attn, entropy, strict=True)])
        frame, counts = self.adapter.merge_units(call)
        kept = [kept_units(n, c.keep) for n in counts]
        dev = scores.device
        rank = rank_in_group(-scores, frame, torch.tensor(counts, device=dev))  # 0: the highest (ties: earlier)
        keep = rank < torch.tensor(kept, device=dev)[frame]
        self.unit_drop = self.adapter.drop_units(call, keep, kept)
        (self._pending if state is None else self.data(state).keep).append(keep)

    # -- decoder input ----------------------------------------------------------------------------------------
    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        data: _Data = self.data(state)
        data.keep, self._pending = self._pending, []  # a tower call before this forward (generate)
        if not any(state.spans):
            return
        b_of, pos, slots = [], [], []
        spans = sorted(((b, sp) for b, sample in enumerate(state.spans) for sp in sample),
                       key=lambda x: x[1].image_index)
        n_prompt = state.visual.shape[1]
        slots = [n_prompt] * len(state.spans)
        for b, sp in spans:
            cand = (~sp.grid()["layout"]).nonzero().flatten()
            b_of.append(torch.full_like(cand, b))
            pos.append(sp.start + cand)
            n_kept = sum(kept_units(t.rows * t.cols, self.config.keep) for t in sp.tiles)  # a tile is a frame
            slots[b] -= cand.numel() - n_kept
            data.units_in += cand.numel()
            data.units_kept += n_kept
        dev = state.visual.device
        data.b_of, data.pos, data.slots = torch.cat(b_of).to(dev), torch.cat(pos).to(dev), slots

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> Kept | None:
        if layer != 0:
            return None
        data: _Data = self.data(state)
        if data.b_of is None:  # no image in the prompt (host data: no sync)
            data.keep = []
            return None
        if not data.keep:
            raise MmeffError("vflowopt-vit: the prompt has images but no vision tower ran in this forward; the "
                             "images must be encoded by this call (pixel_values, not inputs_embeds)")
        kept = torch.cat(data.keep).to(hidden.device)
        data.keep = []
        if kept.numel() != data.b_of.numel():
            raise MmeffError(f"vflowopt-vit: {data.b_of.numel()} image tokens in the prompt but the vision tower "
                             f"scored {kept.numel()} merged tokens in this forward")
        keep = torch.ones(state.visual.shape, dtype=torch.bool, device=hidden.device)
        keep[data.b_of, data.pos] = kept
        return Kept(keep, longest=max(data.slots), uniform=len(set(data.slots)) == 1)

    def stats(self, state: State) -> dict[str, Any]:
        """The tower block after which units were dropped and the merged tokens in / kept there (this prefill)."""
        data: _Data = self.data(state)
        return {"vflowopt_vit_block": self.vit_block, "vflowopt_vit_units_in": data.units_in,
                "vflowopt_vit_units_kept": data.units_kept}


register_method(VFlowOptViTConfig, VFlowOptViT)

__all__ = ["VFlowOptViT", "VFlowOptViTConfig", "kept_units"]
