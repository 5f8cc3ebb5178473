"""Explainability-guided visual token compression at the LLM input (Lei et al., arXiv 2506.01097).

Offline (``mmeff train explain``, :mod:`mmeff.methods.explain.train`): the relevance of each visual token to the
answer is computed with gradient-weighted attention relevance (Chefer et al. 2021) and a small fully
convolutional net, :class:`RelevanceMapper`, learns to predict it from the *first* decoder layer's attention
over the visual grid. Inference (this method, ``Point.INPUT``):

1. before decoder layer 0 runs, a probe runs layer 0's input norm and self-attention (not its MLP, and
   without touching the KV cache) on the full input and reads two statistics of its attention, averaged
   over heads: channel 0 = the last prompt row's attention to each key, channel 1 = the mean attention of
   the instruction rows (real text after the sample's last image, last token included);
2. each image tile's visual cells are laid out in 2-D (``ImageSpan.grid()``), normalised per tile and
   channel by their mean, and mapped to a predicted relevance map;
3. per sample the ``round(n * (1 - ratio))`` visual tokens of highest predicted relevance are kept, the
   rest never enter the decoder (layout tokens such as LLaVA-NeXT's row newlines are always kept).

``scorer="attention"`` (ours; presets ``explain-attn-*``) skips step 2: the tokens are ranked by channel 0 itself,
the last prompt row's layer-0 attention — the input the mapper reads, which the trained mappers do not beat on
held-out relevance (docs/trained-pruners.md). No checkpoint.

Reading of the paper: the compression happens "at the input stage of the LLM", and the mapper "avoids a full
inference pass"; the first layer's attention map is therefore taken from the unpruned input and layer 0
then runs on the kept tokens only. The probe costs one attention of layer 0 over the full sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.ranking import keep_top_of_state
from mmeff.engine.state import State
from mmeff.errors import ConfigError, MmeffError
from mmeff.families.base import Adapter, ImageSpan
from mmeff.heads import open_head

CHANNELS = 2  # last prompt row; mean of the instruction rows


@dataclass(frozen=True)
class ExplainConfig(MethodConfig):
    method = "explain"
    ratio: float = 0.5  # share of visual tokens removed
    checkpoint: str = ""
    scorer: Literal["mapper", "attention"] = "mapper"  # "attention" (ours): channel 0 alone, no checkpoint


class RelevanceMapper(nn.Module):
    """[T, CHANNELS, H, W] first-layer attention maps -> [T, H, W] predicted relevance (any H, W: only 3x3
    and 1x1 convolutions with zero padding, so grids larger than the training ones map alike)."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        layers: list[nn.Module] = []
        ch = CHANNELS
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.GELU()]
            ch = width
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        return self.net(normalise(maps).to(w.dtype))[:, 0]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map (over its last two axes) by its mean: scale-free inputs and targets."""
    return maps / maps.float().mean((-2, -1), keepdim=True).clamp_min(1e-12).to(maps.dtype)


def tile_positions(span: ImageSpan) -> list[torch.Tensor]:
    """Per tile of the span: [rows, cols] long positions (in the sequence) of its visual cells."""
    grid = span.grid()
    out = []
    for t, tl in enumerate(span.tiles):
        sel = (grid["tile"] == t) & ~grid["layout"]
        pos = torch.full((tl.rows, tl.cols), -1, dtype=torch.long)
        pos[grid["row"][sel], grid["col"][sel]] = span.start + sel.nonzero().flatten()
        out.append(pos)
    return out


def probe_weights(visual: torch.Tensor, attention_mask: torch.Tensor | None, n_prompt: int | None = None
                  ) -> torch.Tensor:
    """[B, CHANNELS, N] query-row weights of the two channels (original coordinates); rows at or after
    ``n_prompt`` (a teacher-forced answer) get no weight."""
    b, n = visual.shape
    n_prompt = n if n_prompt is None else n_prompt
    pos = torch.arange(n, device=visual.device).expand(b, n)
    last_vis = torch.where(visual, pos, -1).max(1).values
    instr = (pos > last_vis[:, None]) & (pos < n_prompt)
    if attention_mask is not None:
        instr &= attention_mask.bool().to(visual.device)
    last = pos == n_prompt - 1
    return torch.stack([last, instr | last], 1).float()


def channels_from_probs(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, CHANNELS, N] from full attention probabilities [B, H, N, N] (what the probe computes)."""
    mean = probs.float().mean(1)
    return torch.einsum("bqk,bcq->bck", mean, weights) / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def predict_relevance(mapper: RelevanceMapper, channels: torch.Tensor, spans: list[list[ImageSpan]]
                      ) -> torch.Tensor:
    """[B, N] predicted relevance of each visual cell (0 elsewhere) from probe channels [B, CHANNELS, N]."""
    out = torch.zeros(channels.shape[0], channels.shape[2], device=channels.device)
    for b, sample in enumerate(spans):
        for sp in sample:
            for pos in tile_positions(sp):
                pos = pos.to(channels.device)
                maps = channels[b][:, pos]  # [C, rows, cols]
                out[b, pos.flatten()] = mapper(maps[None])[0].flatten().float()
    return out


def load_mapper(path: str, adapter: Adapter) -> RelevanceMapper:
    file, tensors, meta = open_head(path, "explain", adapter.model, int(adapter.text_config.hidden_size),
                                   len(adapter.layers))
    mapper = RelevanceMapper(int(meta.get("width", 16)), int(meta.get("depth", 3)))
    try:
        mapper.load_state_dict(tensors)
    except RuntimeError as e:
        raise ConfigError(f"{file}: tensors do not match a relevance mapper ({e})") from e
    return mapper.eval()


class _Probe:
    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.channels: torch.Tensor | None = None

    def observe(self, call: AttentionCall) -> None:
        self.channels = torch.stack([call.received(w) for w in self.weights.unbind(1)], 1)


class Explain(Method):
    points = frozenset({Point.INPUT})
    graphable = True

    config: ExplainConfig

    def __init__(self, config: MethodConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.mapper: RelevanceMapper | None = None

    def validate(self, n_layers: int) -> None:
        if not 0.0 <= self.config.ratio <= 1.0:
            raise ConfigError(f"explain: ratio must be in [0, 1], got {self.config.ratio}")
        if self.config.scorer not in ("mapper", "attention"):
            raise ConfigError(f"explain: scorer must be 'mapper' or 'attention', got {self.config.scorer!r}")
        if self.config.scorer == "mapper" and self.mapper is None:
            self.mapper = load_mapper(self.config.checkpoint, self.adapter)

    @torch.no_grad()
    def first_layer_channels(self, state: State, hidden: torch.Tensor) -> torch.Tensor:
        """[B, CHANNELS, N] layer-0 attention statistics of the full input (the probe, see module doc)."""
        if len(state.groups) != 1:
            raise MmeffError("explain prunes at the LLM input: no other method may select tokens before it")
        probe = _Probe(probe_weights(state.visual, state.attention_mask).to(hidden.device))
        self.host.probe_attention(0, hidden, [probe])
        if probe.channels is None:
            raise MmeffError("explain: the layer-0 probe saw no attention call")
        return probe.channels

    @torch.no_grad()
    def select(self, layer: int, state: State, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer != 0 or not bool(state.visual.any()):
            return None
        channels = self.first_layer_channels(state, hidden)
        if self.config.scorer == "attention":
            scores = channels[:, 0].float()
        else:
            scores = predict_relevance(self.mapper.to(hidden.device), channels, state.spans)
        return keep_top_of_state(state, scores, self.config.ratio)


register_method(ExplainConfig, Explain)
