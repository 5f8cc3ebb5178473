"""FIA: fixing imbalanced attention (Tang et al., "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", arXiv 2501.12206; released code: a fork of PAI).

Dual-stream token selection, per image, from the vision tower's CLS attention (CLS row, summed over heads,
computed from the layer's own q/k projections on its input — the tower stays SDPA)::

    local  = top floor(0.25 n) patches by CLS attention in vision layer 0
    global = the patches of vision layer -2 (penultimate) with CLS attention > Q3 + 1.5 IQR
    top    = local minus global;  bottom = global

Qwen towers have no CLS token: the score of a patch is the attention it *receives*, averaged over the query
patches of its attention segment (the image, or the window in Qwen2.5's windowed layers) and the heads; a
merged LLM token takes the mean of its merge x merge patches. LLaVA-NeXT's tiles are stitched and unpadded
exactly as the model does with its features; newline tokens are never selected.

Logit modulation on the last query row, pre-softmax, at decoder layers [start_layer, end_layer)::

    a_j <- a_j + alpha_h |a_j|   (j in top,    alpha = 0.7)
    a_j <- a_j + beta_h  |a_j|   (j in bottom, beta  = 0.3)

Head-specific modulation (the paper's, not in the released code; our reading): heads are modulated in
proportion to how much they already look at the image. With v_h = the share of head h's unmodified
last-row attention on the image tokens, ``alpha_h = alpha * v_h / mean_h v_h`` (same for beta); heads that
ignore the image are left nearly unchanged, visually-engaged heads get the stronger push. ``head_specific =
False`` gives the released code's uniform alpha / beta.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from mmeff.config import MethodConfig, register_method
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point
from mmeff.engine.pipeline import Pipeline
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import boost_last_row, check_layers, key_flags


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
    head_specific: bool = True


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


def cls_attention(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLIP attention: [N, P] CLS-row attention to the patches (summed over heads) from the layer input."""
    n, length, _ = hidden.shape
    q = module.q_proj(hidden[:, :1]).view(n, 1, module.num_heads, -1).transpose(1, 2)
    k = module.k_proj(hidden).view(n, length, module.num_heads, -1).transpose(1, 2)
    att = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1)  # [N, H, 1, L]
    return att[:, :, 0, 1:].sum(1)


def received_attention(module: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Qwen vision attention: [S] attention each patch receives, mean over the queries of its segment, summed
    over heads (the CLS-free equivalent of a CLS row)."""
    import sys

    rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
    s = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *position_embeddings)
    out = torch.empty(s, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]).float() * module.scaling, -1)
        out[a:b] = att.mean(1).sum(0)
    return out


class _Modulate:
    def __init__(self, method: FIA, state: State) -> None:
        self.method, self.state = method, state

    def modify_scores(self, call: AttentionCall, scores: torch.Tensor) -> torch.Tensor:
        st, c = self.state, self.method.config
        top_orig, bottom_orig = st.scratch["fia"]
        k_len = scores.shape[-1]
        top = key_flags(st, call.layer, k_len, top_orig).to(scores.device)
        bottom = key_flags(st, call.layer, k_len, bottom_orig).to(scores.device)
        alpha: torch.Tensor | float = c.alpha
        beta: torch.Tensor | float = c.beta
        if c.head_specific:
            visual = key_flags(st, call.layer, k_len, st.visual).to(scores.device)
            probs = torch.softmax(scores[:, :, -1].float(), -1)
            share = (probs * visual[:, None, :]).sum(-1)  # [B, H]
            weight = share / share.mean(-1, keepdim=True).clamp_min(1e-12)
            alpha, beta = c.alpha * weight, c.beta * weight
        out = boost_last_row(scores, top, alpha)
        return boost_last_row(out, bottom, beta)


class FIA(Method):
    points = frozenset({Point.LAYER})

    config: FIAConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        self.layers = check_layers("fia", c.start_layer, c.end_layer, n_layers)
        depth = len(self.adapter.vision_layers())
        self.vision_idx = tuple(i % depth for i in (c.local_layer, c.global_layer))
        if not all(-depth <= i < depth for i in (c.local_layer, c.global_layer)):
            raise ConfigError(f"fia: vision layers ({c.local_layer}, {c.global_layer}) outside a {depth}-layer tower")
        if not 0.0 < c.top_ratio <= 1.0:
            raise ConfigError(f"fia: top_ratio must be in (0, 1], got {c.top_ratio}")
        self._scores: dict[int, list[torch.Tensor]] = {}
        self._grid: torch.Tensor | None = None

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        layers = self.adapter.vision_layers()
        for idx in sorted(set(self.vision_idx)):
            attn = self.adapter.vision_attention(layers[idx])
            pipeline.add_hook(attn.register_forward_pre_hook(self._record(idx), with_kwargs=True))
        if not self.adapter.has_cls_token:
            tower = self.adapter.vision_tower
            pipeline.add_hook(tower.register_forward_pre_hook(self._record_grid, with_kwargs=True))

    def _record_grid(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.pipeline.is_suspended:
            self._grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _record(self, idx: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.pipeline.is_suspended:  # a side stream's tower call (e.g. VCD's noised image)
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                if self.adapter.has_cls_token:
                    score = cls_attention(module, hidden)
                else:
                    cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
                    score = received_attention(module, hidden, cu, kwargs["position_embeddings"])
            if idx == min(self.vision_idx):  # first recorded layer of a new tower call
                self._scores = {}
            self._scores[idx] = score

        return hook

    # -- mapping patch scores to the decoder's visual tokens ----------------------------------------------
    def _token_scores(self, score: torch.Tensor, state: State) -> list[torch.Tensor]:
        """Per image (prompt order): [n_tokens] scores of its span's tokens (-inf on layout tokens)."""
        fam = self.adapter.family
        spans = [sp for sample in state.spans for sp in sample]
        if fam == "llava":
            return list(score)[: len(spans)]
        if fam == "llava_next":
            return self._next_scores(score, spans)
        return self._qwen_scores(score, spans)

    def _next_scores(self, score: torch.Tensor, spans: list) -> list[torch.Tensor]:
        cfg = self.adapter.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        out, t = [], 0
        for sp in spans:
            _base, _grid = sp.tiles
            rows, cols = get_anyres_image_grid_shape(self._sizes[sp.image_index], cfg.image_grid_pinpoints,
                                                     cfg.vision_config.image_size)
            tiles = score[t + 1 : t + 1 + rows * cols].view(rows, cols, side, side)
            full = tiles.permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
            crop = unpad_image(full, torch.tensor(self._sizes[sp.image_index]))[0]
            body = torch.cat([crop, torch.full((crop.shape[0], 1), float("-inf"), device=crop.device)], 1)
            out.append(torch.cat([score[t], body.flatten()]))
            t += 1 + rows * cols
        return out

    def _qwen_scores(self, score: torch.Tensor, spans: list) -> list[torch.Tensor]:
        from transformers.vision_utils import get_vision_window_index

        vc = self.adapter.model.config.vision_config
        unit = vc.spatial_merge_size**2
        merged = score.view(-1, unit).mean(1)
        if self.adapter.family == "qwen2_5_vl":  # blocks run in window order: undo it
            window_index, _ = get_vision_window_index(self._grid, spatial_merge_size=vc.spatial_merge_size,
                                                      window_size=vc.window_size, patch_size=vc.patch_size)
            merged = merged[torch.argsort(window_index.to(merged.device))]
        return list(torch.split(merged, [sp.length for sp in spans]))

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        sizes = inputs.get("image_sizes")
        self._sizes = [] if sizes is None else [torch.as_tensor(s).tolist() for s in sizes]

    def _select(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._scores) < len(set(self.vision_idx)):
            raise RuntimeError("fia: the vision tower did not run before the decoder (no CLS attention recorded)")
        local = self._token_scores(self._scores[self.vision_idx[0]], state)
        global_ = self._token_scores(self._scores[self.vision_idx[1]], state)
        top = torch.zeros_like(state.visual)
        bottom = torch.zeros_like(state.visual)
        spans = [(b, sp) for b, sample in enumerate(state.spans) for sp in sample]
        for (b, sp), lo, gl in zip(spans, local, global_):
            real = torch.isfinite(lo)
            t, bt = dual_stream(lo[real], gl[real], self.config.top_ratio)
            pos = torch.arange(sp.start, sp.end, device=state.visual.device)[real.to(state.visual.device)]
            top[b, pos] = t.to(top.device)
            bottom[b, pos] = bt.to(top.device)
        return top, bottom

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        if layer not in self.layers or not state.visual.any():
            return []
        if "fia" not in state.scratch:
            state.scratch["fia"] = self._select(state)
        return [_Modulate(self, state)]


register_method(FIAConfig, FIA)
