"""PAI baseline (Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs", ECCV 2024; official code LALBJ/PAI).

Two parts, both at every generation step:

* image-attention amplification on the last query row, pre-softmax, at decoder layers [start_layer,
  end_layer) (2..L): ``a_j <- a_j + alpha |a_j|`` for the visual keys j (alpha = 0.2);
* classifier-free guidance against the no-image prompt (a second sequence with its own KV cache)::

      logits <- log_softmax(l_noimg) + gamma * (log_softmax(l_img) - log_softmax(l_noimg))      (gamma = 1.1)

  applied to the last position of each forward call (the one sampled from). gamma = 1 (with alpha = 0) is
  the unchanged model up to log_softmax (same greedy choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.side_stream import SideStream
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import boost_last_row, check_layers, key_flags, last_position_logits, text_only_inputs


@dataclass(frozen=True)
class PAIConfig(MethodConfig):
    method = "pai"
    alpha: float = 0.2
    gamma: float = 1.1
    start_layer: int = 2
    end_layer: int | None = None


def cfg_logits(with_image: torch.Tensor, no_image: torch.Tensor, gamma: float) -> torch.Tensor:
    """PAI's guidance on [B, V] logits, in log-probabilities."""
    img = torch.log_softmax(with_image.float(), -1)
    txt = torch.log_softmax(no_image.float(), -1)
    return txt + gamma * (img - txt)


class _Amplify:
    def __init__(self, state: State, alpha: float) -> None:
        self.state, self.alpha = state, alpha

    def modify_scores(self, call: AttentionCall, scores: torch.Tensor) -> torch.Tensor:
        visual = key_flags(self.state, call.layer, scores.shape[-1], self.state.visual).to(scores.device)
        return boost_last_row(scores, visual, self.alpha)


@dataclass
class _Data:
    side: SideStream | None = None  # the no-image prompt (CFG), None at gamma = 1
    last: torch.Tensor | None = None  # its last logits [B, V]


class PAI(Method):
    points = frozenset({Point.LAYER, Point.LOGITS})
    Data = _Data

    config: PAIConfig

    def validate(self, n_layers: int) -> None:
        self.layers = check_layers("pai", self.config.start_layer, self.config.end_layer, n_layers)
        if self.config.alpha < 0:
            raise ConfigError(f"pai: alpha must be >= 0, got {self.config.alpha}")

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        if self.config.gamma == 1.0:
            return
        pad = self.adapter.text_config.pad_token_id
        data: _Data = self.data(state)
        data.side = self.host.side_stream(text_only_inputs(state, inputs, 0 if pad is None else int(pad)))
        data.last = data.side.begin()

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        if self.config.alpha > 0 and layer in self.layers and state.visual.any():
            return [_Amplify(state, self.config.alpha)]
        return []

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        data: _Data = self.data(state)
        if data.side is None:
            return logits
        if state.phase == "decode":
            data.last = data.side.step(inputs["input_ids"])
        return last_position_logits(logits, cfg_logits(logits[:, -1], data.last, self.config.gamma))


register_method(PAIConfig, PAI)
