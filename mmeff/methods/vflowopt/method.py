"""VFlowOpt (Yang et al., ICCV 2025; code sihany077/VFlowOpt): importance map, recycling, progressive pruning.

Importance of each visual token (computed inside the vision tower, per *unit*: a CLIP tile or a Qwen image):

    s = context_relevance(vision layer ``vision_layer``; global tokens G by the t rule)
        + alpha_v * softmax(entropy of the token's pixel region over the unit)

    context_relevance_j = mean_{q in G} A[q, j],  A = head-mean attention of the unit,  recv = A.mean(0),
    G = {q : recv_q > t * mean(recv)}               (released, ``t_rule="released"``)
    G = {q : recv_q > min(t * mean(recv), t_max * max(recv))}   (ours, ``t_rule="bounded"``)

An empty G (no token passes) falls back to the most attended token (ours; the released code has no rule);
``handle.stats["vflowopt_empty_global"]`` counts the units where no token passed ``t * mean``. The scored layer
is, by default, the model's feature layer (the deepest vision layer the projector reads), as in the released
code (``illava_vit_k = 25``: the last layer of the 26 SigLIP layers LLaVA-OneVision keeps).

Input stage (before decoder layer 0), per image: of its N non-layout tokens the lowest
``round(L (1 - r_v)) + int(L / m^2)`` are taken out (L = N; with ``layout_in_count`` as released, L = N + the
image's row newlines); those are grouped into m x m spatial cells (``floor(row / m), floor(col / m)`` per tile)
and each cell becomes one token, the score-weighted mean of its members, written at the slot of its
highest-scoring member. Before each decoder layer ``llm_layers[i]`` the lowest ``round(n (1 - llm_ratios[i]))``
of the n remaining tokens of each image are dropped by the same score (n + newlines with ``layout_in_count``).
Layout tokens (LLaVA-NeXT newlines) are never touched; kept tokens keep their original position ids.

Family equivalents (see docs/vflowopt.md): CLIP towers keep the CLS token in the attention (as a query and a
possible global token) and drop its column from the map; LLaVA-NeXT scores each tile (base and anyres) on its
own and lays the anyres tiles out, unpadded, exactly as the model lays out their features; Qwen2-VL /
Qwen2.5-VL score patches in the tower's block-diagonal (window / frame) attention, undo Qwen2.5-VL's window
order, and sum the 2x2 patches of each merged token; a token's pixel region is its 2x2 patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.method import Kept, Method, Point, register_method
from mmeff.engine.ranking import rank_in_group
from mmeff.engine.state import State
from mmeff.errors import ConfigError, MmeffError
from mmeff.families.base import VisionCall
from mmeff.kernels.vflowopt_score import context_relevance, grey_levels, patch_entropy
from mmeff.methods.vflowopt.budget import effective_r_v, effective_schedule, kept_fraction

# OpenAI CLIP normalisation: what the LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL image processors use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VFlowOptConfig(MethodConfig):
    """Defaults: the released 10%-kept config (Qwen2 decoder, 28 layers, stages before layers 9 and 18).

    ``vision_layer`` None (default, released): the model's feature layer (:meth:`Adapter.feature_layer`).
    ``t_rule``: "released" (G = recv > t * mean) or "bounded" (ours: the threshold is capped at ``t_max`` times
    the largest recv, so G is never empty). ``layout_in_count``: False (ours) counts an image's real tokens only
    in L; True (released) counts its row newlines too (LLaVA-NeXT; they are never dropped, so it removes more
    real tokens than the ratios say).
    """

    method = "vflowopt"
    vision_layer: int | None = None  # vision layer whose attention is scored (negative: from the end); None: feature
    t: float = 39.26492840997221  # global tokens: received attention above t times the mean (released rule)
    t_rule: str = "released"  # "released" | "bounded" (ours: threshold min(t * mean, t_max * max))
    t_max: float = 0.5  # "bounded": the threshold never exceeds this fraction of the largest received attention
    layout_in_count: bool = False  # True (released): L counts the image's row newlines; False (ours): real tokens
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
@functools.lru_cache(maxsize=16)
def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """[3, 1] constants on ``device``, made once (a captured prefill may not copy host data to the device)."""
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _unnormalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[..., 3, P] normalised pixels -> [0, 1] (per channel)."""
    return pixels.float() * _channel_values(std, pixels.device) + _channel_values(mean, pixels.device)


def token_entropy(regions: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[T, 3, P] normalised pixels of each token's region -> [T] entropy (bits) of its grey-level histogram."""
    return patch_entropy(grey_levels(_unnormalise(regions, mean, std)))


def combine(attn: torch.Tensor, entropy: torch.Tensor, alpha_v: float) -> torch.Tensor:
    """Importance of a unit's tokens: context relevance + alpha_v * softmax(entropy over the unit)."""
    return attn.float() + alpha_v * torch.softmax(entropy.float(), dim=-1)


def low_counts(counts: list[int], r_v: float, m: float, recycle: bool = True, layout: list[int] | None = None
               ) -> list[int]:
    """Per image of N non-layout tokens, how many leave at the input stage: ``round(L (1 - r_v)) + int(L / m^2)``
    (``round(L (1 - r_v))`` without recycling), at most N; L = N + ``layout[i]`` (the released count, where the
    image's newlines are part of the token count but never leave; default: L = N)."""
    extra = layout if layout is not None else [0] * len(counts)
    out = []
    for n, h in zip(counts, extra, strict=True):
        total = n + h
        low = round(total * (1.0 - r_v)) + (int(total / (m * m)) if recycle else 0)
        out.append(min(n, low))
    return out


def recycle_plan(scores: torch.Tensor, unit: torch.Tensor, cell: torch.Tensor, counts: list[int], r_v: float,
                 m: float, recycle: bool = True, tables: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-stage decision for the packed non-layout tokens of several images at once (no host sync).

    ``scores``/``unit``/``cell``: [T] — importance, image index (each image's tokens contiguous, images in
    order, ``counts`` tokens each) and recycling cell id (distinct per (image, tile, floor(row/m),
    floor(col/m)), see :func:`cell_ids`). Per image of N tokens the ``round(N (1 - r_v)) + int(N / m^2)`` lowest
    (ties: the earlier token) leave; those of one cell merge into its highest-scoring member (ties: the
    earlier), which stays. Returns (kept [T] bool, rep [T] long: the packed index of the token's cell
    representative for every recycled token, -1 otherwise). ``recycle=False`` (ablation) drops the
    ``round(N (1 - r_v))`` lowest and recycles nothing. ``tables``: (counts, low counts) already on the device.
    """
    dev, total = scores.device, scores.numel()
    if tables is None:
        tables = (torch.tensor(counts, device=dev), torch.tensor(low_counts(counts, r_v, m, recycle), device=dev))
    low = rank_in_group(scores, unit, tables[0]) < tables[1][unit]
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


@dataclass
class _Data:
    scores: torch.Tensor | None = None  # [B, N] importance of each prunable visual token (-inf elsewhere)
    span_map: torch.Tensor | None = None  # [B, N] image number of each prunable visual token (-1 elsewhere)
    n_images: int = 0
    units: list[torch.Tensor] = field(default_factory=list)  # importance per vision unit encoded before ``begin``
    empty: list[torch.Tensor] = field(default_factory=list)  # per vision call: [units] no token passed t * mean
    n_global: list[torch.Tensor] = field(default_factory=list)  # per vision call: [units] |G| as used
    plan: _Plan | None = None  # the packed layout of the images' tokens (host data, made in ``begin``)
    bound: list[int] = field(default_factory=list)  # per image: most prunable slots it can hold now (host)


@dataclass
class _Plan:
    """What the input stage needs that depends on the spans only: made on the host before the forward, so the
    forward itself reads nothing back (a captured prefill, mmeff.engine.prefill_graph, replays it)."""

    b_of: torch.Tensor  # [T] sample of each packed non-layout visual token
    pos: torch.Tensor  # [T] its original position
    unit: torch.Tensor  # [T] its image (packed order)
    cell: torch.Tensor  # [T] its recycling cell
    tables: tuple[torch.Tensor, torch.Tensor]  # per image: token count, low count (recycle_plan)
    span_map: torch.Tensor  # [B, N] packed image of each prunable position (-1 elsewhere)
    span_of: list[int]  # per packed image: its image index (order of the tower's units)
    counts: list[int]  # per packed image: non-layout tokens
    low: list[int]  # per packed image: tokens that leave at the input stage (low_counts)
    layout: list[int]  # per packed image: row newlines counted in L (layout_in_count; else zeros)
    layout_t: torch.Tensor  # the same on the device, plus a 0 for "not prunable" (the LLM stages' extra group)
    cells: list[int]  # per packed image: recycling cells
    sample: list[int]  # per packed image: its sample
    other: list[int]  # per sample: prompt slots that are not prunable visual tokens


def check_importance(c: Any, name: str) -> None:
    """The importance map's settings (``t``, ``t_rule``, ``t_max``, pixel statistics) of a config ``c`` of method
    ``name``: one :class:`ConfigError` naming the bad one."""
    if c.t < 0:
        raise ConfigError(f"{name}: t must be >= 0, got {c.t}")
    if c.t_rule not in ("released", "bounded"):
        raise ConfigError(f"{name}: t_rule must be 'released' or 'bounded', got {c.t_rule!r}")
    if not 0.0 < c.t_max < 1.0:
        raise ConfigError(f"{name}: t_max (fraction of the largest received attention) must be in (0, 1), "
                          f"got {c.t_max}")
    if len(c.pixel_mean) != 3 or len(c.pixel_std) != 3:
        raise ConfigError(f"{name}: pixel_mean and pixel_std need 3 values (RGB)")


class VFlowOpt(Method):
    points = frozenset({Point.ENCODER, Point.INPUT, Point.LAYER})
    graphable = True
    Data = _Data

    config: VFlowOptConfig

    def __init__(self, config: VFlowOptConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.layers: tuple[int, ...] = ()
        self.ratios: tuple[float, ...] = ()
        # importance per vision unit (a CLIP tile, a Qwen image), in encoder order, until the input stage: the
        # tower may run before the prefill's state exists (generate encodes images first)
        self._units: list[torch.Tensor] = []
        self._empty: list[torch.Tensor] = []  # the global-rule record of those units (stats)
        self._n_global: list[torch.Tensor] = []
        self.vision_layer: int = 0  # the scored layer, resolved in validate (for messages)

    # -- set-up -------------------------------------------------------------------------------------------
    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 0.0 < effective_r_v(c) <= 1.0:
            raise ConfigError(f"vflowopt: r_v must be in (0, 1], got {effective_r_v(c)}")
        if not c.m >= 1.0:
            raise ConfigError(f"vflowopt: m (cell side in tokens) must be >= 1, got {c.m}")
        check_importance(c, "vflowopt")
        if any(not 0.0 <= r <= 1.0 for r in c.llm_ratios):
            raise ConfigError(f"vflowopt: llm_ratios must lie in [0, 1], got {list(c.llm_ratios)}")
        if c.budget is not None and not 0.0 <= c.budget < 1.0:
            raise ConfigError(f"vflowopt: budget must be in [0, 1), got {c.budget}")
        n_vision = len(self.adapter.vision_layers())
        layer = c.vision_layer
        if layer is None:
            layer = self.adapter.feature_layer()
            if layer is None:
                raise ConfigError("vflowopt: the model's image features are the vision embeddings (feature layer 0), "
                                  "so no attention layer feeds them; set vision_layer explicitly")
        if not -n_vision <= layer < n_vision:
            raise ConfigError(f"vflowopt: vision_layer {layer} outside the {n_vision}-layer vision tower")
        self.vision_layer = layer % n_vision
        self.vision_layers = (self.vision_layer,)
        self.layers, self.ratios = effective_schedule(c, n_layers)

    @property
    def r_v(self) -> float:
        return effective_r_v(self.config)

    # -- the importance map, inside the vision tower ----------------------------------------------------------
    def observe_vision(self, call: VisionCall, state: State | None) -> None:
        c = self.config
        regions, counts = self.adapter.token_regions(call.pixels, call.grid)
        entropy = token_entropy(regions, c.pixel_mean, c.pixel_std).split(counts)
        q, k, scale = call.qk()
        block, unit, n_units = call.segments()
        t_max = c.t_max if c.t_rule == "bounded" else None
        rel = context_relevance(q, k, scale, block, unit, c.t, n_units, t_max, details=True)
        attn = call.unit_tokens(rel.scores, "sum")
        if state is None:
            units, empty, n_global = self._units, self._empty, self._n_global
        else:
            data = self.data(state)
            units, empty, n_global = data.units, data.empty, data.n_global
        units.extend(combine(a, e, c.alpha_v) for a, e in zip(attn, entropy, strict=True))
        empty.append(rel.empty)
        n_global.append(rel.n_global)

    def stats(self, state: State) -> dict[str, Any]:
        """Of the vision units (CLIP tiles, Qwen images) scored in the last prefill: how many
        (``vflowopt_units``), how many had no token above ``t * mean(recv)`` (``vflowopt_empty_global``: with the
        released rule these use the most attended token alone), and their mean |G| (``vflowopt_global_tokens``)."""
        data: _Data = self.data(state)
        if not data.empty:
            return {"vflowopt_units": 0, "vflowopt_empty_global": 0, "vflowopt_global_tokens": 0.0}
        empty, n_global = torch.cat(data.empty), torch.cat(data.n_global)
        return {"vflowopt_units": empty.numel(), "vflowopt_empty_global": empty.sum(),
                "vflowopt_global_tokens": n_global.mean()}

    def image_scores(self, state: State) -> list[torch.Tensor]:
        """Importance of every image's tokens in span order (grid cells row-major, layout tokens excluded)."""
        data: _Data = self.data(state)
        units, data.units = data.units, []
        spans = sorted((sp for sample in state.spans for sp in sample), key=lambda sp: sp.image_index)
        out = self.adapter.image_tokens(units, spans, state.span_inputs)
        if out is None:
            raise MmeffError(
                f"vflowopt: {len(spans)} image(s) in the prompt but the vision tower produced {len(units)} scored "
                "unit(s) in this forward; the images must be encoded by this call (pixel_values, not inputs_embeds)"
            )
        for sp, scores in zip(spans, out):
            n_tok = sum(t.rows * t.cols for t in sp.tiles)
            if scores.numel() != n_tok:
                raise MmeffError(
                    f"vflowopt: image {sp.image_index} has {n_tok} visual tokens but its importance map has "
                    f"{scores.numel()} entries (vision layer {self.vision_layer})"
                )
        return out

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        data: _Data = self.data(state)
        # units of images encoded before this forward (generate) belong to this generation's data, so that a
        # replayed prefill graph reads them from the state it copies (mmeff.engine.prefill_graph)
        data.units, self._units = self._units, []
        data.empty, data.n_global, self._empty, self._n_global = self._empty, self._n_global, [], []
        if any(state.spans):
            data.plan = self._plan(state)

    def _plan(self, state: State) -> _Plan:
        """The packed layout of every image's non-layout tokens, from the spans (host data)."""
        dev = state.visual.device
        b_of, pos, unit, tile, row, col, span_of, counts, sample, layout = [], [], [], [], [], [], [], [], [], []
        span_map = torch.full(state.visual.shape, -1, dtype=torch.long)  # original position -> packed image
        for b, spans in enumerate(state.spans):
            for sp in spans:
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
                sample.append(b)
                layout.append(sum(t.rows for t in sp.tiles if t.newline) if self.config.layout_in_count else 0)
                span_map[b, sp.start + cand] = len(counts) - 1
        unit_t = torch.cat(unit)
        cell = cell_ids(unit_t, torch.cat(tile), torch.cat(row), torch.cat(col), self.config.m)
        image_of_cell = torch.zeros(int(cell.max()) + 1, dtype=torch.long).scatter_(0, cell, unit_t)
        cells = torch.bincount(image_of_cell, minlength=len(counts)).tolist()
        c = self.config
        low = low_counts(counts, self.r_v, c.m, c.recycle, layout)
        n = state.visual.shape[1]
        other = [n - sum(k for k, s_ in zip(counts, sample) if s_ == b) for b in range(len(state.spans))]
        return _Plan(
            torch.cat(b_of).to(dev), torch.cat(pos).to(dev), unit_t.to(dev), cell.to(dev),
            (torch.tensor(counts, device=dev), torch.tensor(low, device=dev)), span_map.to(dev),
            span_of, counts, low, layout, torch.tensor([*layout, 0], device=dev), cells, sample, other,
        )

    def _slots(self, plan: _Plan, bound: list[int]) -> list[int]:
        """Per sample: the most prompt slots it can hold, given each image's bound."""
        per_sample = list(plan.other)
        for k, b in zip(bound, plan.sample):
            per_sample[b] += k
        return per_sample

    # -- decoder ------------------------------------------------------------------------------------------
    def select(self, layer: int, state: State, hidden: torch.Tensor) -> Any:
        if layer == 0:
            return self._input_stage(state, hidden)
        if layer in self.layers:
            return self._llm_stage(state, self.ratios[self.layers.index(layer)])
        return None

    def _input_stage(self, state: State, hidden: torch.Tensor) -> Kept | None:
        data: _Data = self.data(state)
        plan = data.plan
        if plan is None:  # no image in the prompt (host data: no sync)
            data.units = []
            return None
        scores = self.image_scores(state)
        s = torch.cat([scores[i].to(hidden.device) for i in plan.span_of])
        c = self.config
        kept, rep = recycle_plan(s, plan.unit, plan.cell, plan.counts, self.r_v, c.m, c.recycle, plan.tables)
        full = torch.full(state.visual.shape, float("-inf"), device=hidden.device)
        full[plan.b_of, plan.pos] = s.float()
        keep = torch.ones(state.visual.shape, dtype=torch.bool, device=hidden.device)
        keep[plan.b_of, plan.pos] = kept
        new_hidden = hidden.clone()
        new_hidden[plan.b_of, plan.pos] = merge_cells(hidden[plan.b_of, plan.pos], s, rep)
        data.scores, data.span_map, data.n_images = full, plan.span_map, len(plan.counts)
        # kept per image: N - low + (cells with a low member) <= N - low + min(low, cells): a bound from the host,
        # exact when every cell lost a member (fill slots cover the rest, see engine.state.select)
        data.bound = [n - lo + (min(lo, k) if c.recycle else 0) for n, lo, k in zip(plan.counts, plan.low, plan.cells)]
        slots = self._slots(plan, data.bound)
        # without recycling the bound is the count itself: no fill slot when every sample keeps as many
        return Kept(keep, new_hidden, longest=max(slots), uniform=not c.recycle and len(set(slots)) == 1)

    def _llm_stage(self, state: State, ratio: float) -> Kept | None:
        """Per image, drop the ``round(n (1 - ratio))`` lowest of its n prunable slots (ties: the earlier)."""
        data: _Data = self.data(state)
        if ratio >= 1.0 or data.span_map is None:  # nothing to drop: decided on the host, no sync
            return None
        g = state.group
        span_map, n_spans = data.span_map, data.n_images
        scores = torch.gather(data.scores, 1, g.index).flatten()
        span = torch.gather(span_map, 1, g.index)
        span = torch.where(state.prunable_in_group(g) & (span >= 0), span, n_spans).flatten()  # n_spans: not prunable
        count = torch.zeros(n_spans + 1, dtype=torch.long, device=span.device)
        count.index_add_(0, span, torch.ones_like(span))  # not bincount: that reads the max back (a sync)
        plan = data.plan
        # released count (layout_in_count): the image's newlines are part of n but never dropped
        n_drop = torch.round((count + plan.layout_t).double() * (1.0 - ratio)).long()
        n_drop[n_spans:].zero_()  # a fill kernel: ``n_drop[i] = 0`` copies a host scalar (a capture refuses it)
        keep = (rank_in_group(scores, span, count) >= n_drop[span]).view(g.index.shape)
        # n - min(n, round((n + h) (1 - ratio))) grows with n: each image's bound follows from its bound before
        data.bound = [k - min(k, round((k + h) * (1.0 - ratio))) for k, h in zip(data.bound, plan.layout)]
        return Kept(keep, longest=max(self._slots(data.plan, data.bound)))


register_method(VFlowOptConfig, VFlowOpt)

__all__ = ["VFlowOpt", "VFlowOptConfig", "averaged_kept", "cell_ids", "merge_cells", "recycle_plan", "token_entropy"]


def averaged_kept(config: VFlowOptConfig, n_layers: int) -> float:
    """Nominal visual-token share kept, averaged over the decoder layers (recycled cells not counted)."""
    layers, ratios = effective_schedule(config, n_layers)
    return kept_fraction(effective_r_v(config), layers, ratios, n_layers)



