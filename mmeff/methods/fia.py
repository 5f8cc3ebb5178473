"""FIA: fixing imbalanced attention (Arif et al., arXiv 2501.12206: "Fixing Imbalanced Attention to Mitigate
In-Context Hallucination of Large Vision-Language Model", later retitled "PAINT: Paying Attention to INformed
Tokens ..."; released code hasanar1f/PAINT, a fork of PAI).

Dual-stream token selection, per image, from the vision tower's CLS attention (CLS row, summed over heads,
computed from the layer's own q/k projections on its input — the tower stays SDPA)::

    local  = top floor(0.25 n) patches by CLS attention in vision layer 0
    global = the patches of vision layer -2 (penultimate) with CLS attention > Q3 + 1.5 IQR
    top    = local minus global;  bottom = global

Qwen towers have no CLS token: the score of a patch is the attention it *receives*, averaged over the query
patches of its attention segment (the image, or the window in Qwen2.5's windowed layers) and the heads; a
merged LLM token takes the mean of its merge x merge patches. LLaVA-NeXT's tiles are stitched and unpadded
exactly as the model does with its features; newline tokens are never selected. (The release is LLaVA-1.5
only, and selects from the batch's first image for every sample; we select per image.)

Logit modulation on the last query row, pre-softmax, at decoder layers [start_layer, end_layer)::

    a_j <- a_j + alpha_h |a_j|   (j in top)
    a_j <- a_j + beta_h  |a_j|   (j in bottom)

with PAI's classifier-free guidance against the no-image prompt on the logits (gamma 1.1, plausibility cutoff
0.1: :func:`mmeff.methods.pai.cfg_logits`), which the release always runs with. ``reading="released"``: as in
PAI's release the modulation is skipped for the step that produces the first token when CFG is on (one-word
answers get CFG only); ``"text"`` modulates every step. The released scripts: CHAIR alpha 0.9 / beta 0.3 (the
``fia`` preset), POPE alpha 0.5; the parser's default alpha 0.7.

Head-specific modulation (the paper's text, not in the released code; ``head_specific=True``, our reading,
preset ``fia-heads``): heads are modulated in proportion to how much they already look at the image. With
v_h = the share of head h's unmodified last-row attention on the image tokens,
``alpha_h = alpha * min(v_h / mean_h v_h, head_cap)`` (same for beta): heads that ignore the image are left
nearly unchanged, visually engaged heads get at most ``head_cap`` times the uniform push (unbounded, the
ratio reaches H for a single engaged head).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.side_stream import SideStream
from mmeff.engine.state import State
from mmeff.errors import ConfigError, MmeffError
from mmeff.families.base import VisionCall
from mmeff.methods._halluc import boost_last_row, check_layers, key_flags
from mmeff.methods.pai import amplifies, check_guidance, guided_logits, start_guidance


@dataclass(frozen=True)
class FIAConfig(MethodConfig):
    method = "fia"
    alpha: float = 0.7
    beta: float = 0.3
    top_ratio: float = 0.25
    local_layer: int = 0
    global_layer: int = -2
    start_layer: int = 2
    end_layer: int | None = None
    gamma: float = 1.1  # PAI's CFG against the no-image prompt (1: none)
    cutoff: float | None = 0.1  # its plausibility cutoff
    reading: Literal["released", "text"] = "released"  # when the modulation acts (the module doc)
    head_specific: bool = False  # ours: the paper's head rule as we read it
    head_cap: float = 2.0  # bound of the head factor v_h / mean v (head_specific only)


def dual_stream(local: torch.Tensor, global_: torch.Tensor, top_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom) bool masks over one image's n patches from its local / global CLS scores [n]."""
    n = local.numel()
    q1, q3 = torch.quantile(global_.float(), torch.tensor([0.25, 0.75], device=global_.device))
    n_out = int((global_.float() > q3 + 1.5 * (q3 - q1)).sum())
    bottom = torch.zeros(n, dtype=torch.bool, device=local.device)
    bottom[torch.topk(global_, n_out).indices] = True
    top = torch.zeros_like(bottom)
    top[torch.topk(local, int(n * top_ratio)).indices] = True
    return top & ~bottom, bottom


def segment_received(q: torch.Tensor, k: torch.Tensor, scale: float, block: torch.Tensor, prefix: int
                     ) -> torch.Tensor:
    """[S] attention each position receives inside its attention block (q, k: [H, S, D] packed, ``block`` [S]
    contiguous block ids), summed over heads: from the block's first ``prefix`` rows (CLIP: the CLS row), or
    averaged over all its rows when ``prefix`` is 0 (Qwen's CLS-free towers)."""
    out = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
    counts = torch.unique_consecutive(block, return_counts=True)[1].tolist()
    for a, b in itertools.pairwise([0, *itertools.accumulate(counts)]):
        rows = q[:, a : a + prefix] if prefix else q[:, a:b]
        att = torch.softmax(torch.einsum("hqd,hkd->hqk", rows, k[:, a:b]).float() * scale, -1)
        out[a:b] = att.mean(1).sum(0)
    return out


class _Modulate:
    def __init__(self, method: FIA, state: State) -> None:
        self.method, self.state = method, state

    def modify_scores(self, call: AttentionCall, scores: torch.Tensor) -> torch.Tensor:
        st, c = self.state, self.method.config
        top_orig, bottom_orig = self.method.data(st).streams
        k_len = scores.shape[-1]
        top = key_flags(st, call.layer, k_len, top_orig).to(scores.device)
        bottom = key_flags(st, call.layer, k_len, bottom_orig).to(scores.device)
        alpha: torch.Tensor | float = c.alpha
        beta: torch.Tensor | float = c.beta
        if c.head_specific:
            visual = key_flags(st, call.layer, k_len, st.visual).to(scores.device)
            probs = torch.softmax(scores[:, :, -1].float(), -1)
            share = (probs * visual[:, None, :]).sum(-1)  # [B, H]
            weight = (share / share.mean(-1, keepdim=True).clamp_min(1e-12)).clamp_max(c.head_cap)
            alpha, beta = c.alpha * weight, c.beta * weight
        out = boost_last_row(scores, top, alpha)
        return boost_last_row(out, bottom, beta)


@dataclass
class _Data:
    streams: tuple[torch.Tensor, torch.Tensor] | None = None  # (top, bottom) [B, N] bool, original positions
    side: SideStream | None = None  # the no-image prompt (CFG), None at gamma = 1
    last: torch.Tensor | None = None  # its last logits [B, V]


class FIA(Method):
    points = frozenset({Point.ENCODER, Point.LAYER, Point.LOGITS})
    Data = _Data

    config: FIAConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        self.layers = check_layers("fia", c.start_layer, c.end_layer, n_layers)
        depth = len(self.adapter.vision_layers())
        if not all(-depth <= i < depth for i in (c.local_layer, c.global_layer)):
            raise ConfigError(f"fia: vision layers ({c.local_layer}, {c.global_layer}) outside a {depth}-layer tower")
        if not 0.0 < c.top_ratio <= 1.0:
            raise ConfigError(f"fia: top_ratio must be in (0, 1], got {c.top_ratio}")
        if c.alpha < 0 or c.beta < 0:
            raise ConfigError(f"fia: alpha and beta must be >= 0, got {c.alpha}, {c.beta}")
        if not c.head_cap >= 1.0:
            raise ConfigError(f"fia: head_cap must be >= 1 (the factor's mean is 1), got {c.head_cap}")
        check_guidance("fia", c.gamma, c.cutoff, c.reading)
        self.vision_idx = tuple(i % depth for i in (c.local_layer, c.global_layer))
        self.vision_layers = tuple(sorted(set(self.vision_idx)))
        # per observed vision layer, the per-unit token scores of the last tower call (the tower may run before
        # the prefill's state exists: generate encodes images first)
        self._units: dict[int, list[torch.Tensor]] = {}

    def observe_vision(self, call: VisionCall, state: State | None) -> None:
        if call.layer == self.vision_layers[0]:  # first observed layer of a new tower call
            self._units = {}
        q, k, scale = call.qk()
        block, _, _ = call.segments()
        score = segment_received(q, k, scale, block, self.adapter.vision_prefix)
        self._units[call.layer] = call.unit_tokens(score, "mean")

    def _image_scores(self, layer: int, spans: list, state: State) -> list[torch.Tensor]:
        scores = self.adapter.image_tokens(self._units[layer], spans, state.span_inputs)
        if scores is None:
            raise MmeffError(f"fia: the vision tower's tiles do not add up to the prompt's {len(spans)} image(s)")
        return scores

    def _select(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._units) < len(self.vision_layers):
            raise MmeffError("fia: the vision tower did not run before the decoder (no CLS attention recorded)")
        spans = [(b, sp) for b, sample in enumerate(state.spans) for sp in sample]
        ordered = sorted((sp for _, sp in spans), key=lambda sp: sp.image_index)
        local = self._image_scores(self.vision_idx[0], ordered, state)
        global_ = self._image_scores(self.vision_idx[1], ordered, state)
        top = torch.zeros_like(state.visual)
        bottom = torch.zeros_like(state.visual)
        for b, sp in spans:
            lo, gl = local[sp.image_index], global_[sp.image_index]
            t, bt = dual_stream(lo, gl, self.config.top_ratio)
            pos = (sp.start + (~sp.grid()["layout"]).nonzero().flatten()).to(state.visual.device)
            top[b, pos] = t.to(top.device)
            bottom[b, pos] = bt.to(top.device)
        return top, bottom

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        start_guidance(self, self.data(state), state, inputs, self.config.gamma)

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        c = self.config
        if layer not in self.layers or not state.visual.any() or not amplifies(c.reading, c.gamma, state):
            return []
        data: _Data = self.data(state)
        if data.streams is None:
            data.streams = self._select(state)
        return [_Modulate(self, state)]

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return guided_logits(self.data(state), state, logits, inputs, self.config.gamma, self.config.cutoff)


register_method(FIAConfig, FIA)
