"""DyVTE (dynamic visual-token exit; code DoubtedSteam/DyVTE): learned routers decide when an MLLM no longer
needs its visual tokens, and from that layer on all of them are removed.

Router ``r_k`` (k = 1 .. L-1) reads the hidden states entering decoder layer ``k`` (the output of layer
k-1), detached, as one feature vector per sample::

    f = concat(mean_{i in T} h_i, h_last)      T: the text tokens after the sample's last image, up to but
                                               excluding the last prompt token (empty T: the last token's state)
    p_exit = softmax(W2 · GELU(W1 · f))[1]     bias-free, W1: 2d -> width, W2: width -> 2, Xavier init

At prefill the routers are asked in layer order; the first ``k`` with ``p_exit > threshold`` (0.5) removes
*all* visual tokens of that sample from layer ``k`` on — hidden states, mask, positions and KV cache, for
every decode step. Samples of a batch exit at different layers (the keep mask is per sample). Spans come
from the input (``State.visual``), never from fixed prompt/image lengths.

The routers are trained by ``mmeff train dyvte`` (:mod:`mmeff.methods.dyvte.train`) and loaded from ``checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmeff.config import MethodConfig
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.families.base import Adapter
from mmeff.heads import open_head


@dataclass(frozen=True)
class DyVTEConfig(MethodConfig):
    method = "dyvte"
    checkpoint: str = ""
    threshold: float = 0.5
    min_layer: int = 1  # earliest layer an exit may happen at (routers of earlier layers are not asked)


class DyVTERouters(nn.Module):
    """One bias-free MLP router per exit layer k = 1 .. num_layers - 1 (``routers[k - 1]``)."""

    def __init__(self, hidden_size: int, num_layers: int, width: int = 2048) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.width = hidden_size, num_layers, width
        self.routers = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_size, width, bias=False), nn.GELU(), nn.Linear(width, 2, bias=False))
            for _ in range(num_layers - 1)
        )
        for r in self.routers:
            for lin in (r[0], r[2]):
                nn.init.xavier_uniform_(lin.weight)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits (class 1 = exit) of the router deciding before decoder layer ``layer``."""
        if not 1 <= layer < self.num_layers:
            raise IndexError(f"DyVTE routers exist for layers 1..{self.num_layers - 1}, not {layer}")
        router = self.routers[layer - 1]
        return router(features.to(router[0].weight.dtype))


def text_after_image(visual: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, N] bool: real text tokens after each sample's last visual token, excluding the last position."""
    b, n = visual.shape
    pos = torch.arange(n, device=visual.device).expand(b, n)
    last_vis = torch.where(visual, pos, -1).max(1).values  # -1: no image
    out = (pos > last_vis[:, None]) & (pos < n - 1) & (last_vis[:, None] >= 0)
    if attention_mask is not None:
        out &= attention_mask.bool().to(visual.device)
    return out


def router_features(hidden: torch.Tensor, text: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, 2d] float32: concat(mean of ``hidden`` over ``text`` [B, L] rows, ``hidden`` at slot ``last`` [B]).
    Rows without text use the last token's state for the mean."""
    h = hidden.detach().float()
    rows = torch.arange(h.shape[0], device=h.device)
    last_h = h[rows, last]
    w = text.to(h.device, h.dtype)
    count = w.sum(1, keepdim=True)
    mean = torch.einsum("bl,bld->bd", w, h) / count.clamp_min(1.0)
    mean = torch.where(count > 0, mean, last_h)
    return torch.cat([mean, last_h], -1)


def load_routers(path: str, adapter: Adapter) -> DyVTERouters:
    file, tensors, meta = open_head(path, "dyvte", adapter.model, int(adapter.text_config.hidden_size),
                                   len(adapter.layers))
    routers = DyVTERouters(int(adapter.text_config.hidden_size), len(adapter.layers), int(meta.get("width", 2048)))
    try:
        routers.load_state_dict(tensors)
    except RuntimeError as e:
        raise ConfigError(f"{file}: tensors do not match a DyVTE router set ({e})") from e
    return routers.eval()


@dataclass
class _Data:
    text: torch.Tensor | None = None  # [B, N] the router's text rows (original coordinates)
    exit_layers: list[int] = field(default_factory=list)  # per sample; num_layers = never exited


class DyVTE(Method):
    points = frozenset({Point.LAYER})
    graphable = True
    Data = _Data

    config: DyVTEConfig

    def __init__(self, config: MethodConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.routers: DyVTERouters | None = None

    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 0.0 <= c.threshold <= 1.0:
            raise ConfigError(f"dyvte: threshold must be in [0, 1], got {c.threshold}")
        if not 1 <= c.min_layer < n_layers:
            raise ConfigError(f"dyvte: min_layer must be in [1, {n_layers - 1}], got {c.min_layer}")
        if self.routers is None:
            self.routers = load_routers(c.checkpoint, self.adapter)

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        data: _Data = self.data(state)
        data.text = text_after_image(state.visual, state.attention_mask)
        data.exit_layers = [len(self.adapter.layers)] * state.batch_size

    def exit_probability(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[B] probability that the samples leave their visual tokens behind from ``layer`` on."""
        routers = self.routers.to(features.device)
        return torch.softmax(routers(layer, features).float(), -1)[:, 1]

    @torch.no_grad()
    def select(self, layer: int, state: State, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer < self.config.min_layer:
            return None
        g = state.group
        vis = state.visual_in_group(g)
        pending = vis.any(1)  # a sample that exited holds no visual slot any more
        if not bool(pending.any()):
            return None
        data: _Data = self.data(state)
        text = torch.gather(data.text, 1, g.index) & g.valid
        last = torch.full((g.index.shape[0],), g.index.shape[1] - 1, device=g.index.device)
        p = self.exit_probability(layer, router_features(hidden, text, last))
        leave = pending & (p > self.config.threshold).to(pending.device)
        if not bool(leave.any()):
            return None
        for b in leave.nonzero().flatten().tolist():
            data.exit_layers[b] = layer
        return ~(vis & leave[:, None])

    def stats(self, state: State) -> dict[str, Any]:
        """``exit_layers``: per sample of the last prefill, the layer its visual tokens left at (L: never)."""
        return {"exit_layers": list(self.data(state).exit_layers)}


register_method(DyVTEConfig, DyVTE)
