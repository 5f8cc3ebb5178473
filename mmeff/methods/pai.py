"""PAI baseline (Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs", ECCV 2024; official code LALBJ/PAI).

Two parts:

* image-attention amplification on the last query row, pre-softmax, at decoder layers [start_layer,
  end_layer) (2..L): ``a_j <- a_j + alpha |a_j|`` for the visual keys j (alpha = 0.2);
* classifier-free guidance against the no-image prompt (a second sequence with its own KV cache), with the
  released code's plausibility cutoff (tokens whose image-conditioned log-probability is below
  ``log(cutoff) + max`` are removed)::

      lp = log_softmax(l_img),  lq = log_softmax(l_noimg)
      logits <- lq + gamma * (lp - lq),  and -inf where lp < log(cutoff) + max(lp)     (gamma 1.1, cutoff 0.1)

  applied to the last position of each forward call (the one sampled from). gamma = 1 is the unchanged model
  (no second sequence, no cutoff), as in the released code.

When the amplification acts (``reading``):

* ``"released"`` (default; LALBJ/PAI): with CFG on (gamma != 1) the step that produces the *first* token — the
  prefill — is not amplified (the attention patch runs only ``if use_attn and not use_cfg``, and ``use_cfg``
  is switched off by the CFG processor only after its first call); every later step is. So a one-word answer
  (POPE, MME) gets CFG only. With gamma = 1 every step is amplified.
* ``"text"`` (the paper's description): every step is amplified, the first one included (preset ``pai-text``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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
    cutoff: float | None = 0.1  # CFG plausibility cutoff (the released code's 0.1); None: no cutoff
    reading: Literal["released", "text"] = "released"  # when the amplification acts (see the module doc)


def cfg_logits(with_image: torch.Tensor, no_image: torch.Tensor, gamma: float,
               cutoff: float | None = None) -> torch.Tensor:
    """PAI's guidance on [B, V] logits, in log-probabilities; ``cutoff``: drop (-inf) the tokens whose
    image-conditioned log-probability is below ``log(cutoff)`` + its maximum."""
    img = torch.log_softmax(with_image.float(), -1)
    txt = torch.log_softmax(no_image.float(), -1)
    out = txt + gamma * (img - txt)
    if cutoff is not None:
        out = out.masked_fill(img < math.log(cutoff) + img.amax(-1, keepdim=True), float("-inf"))
    return out


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
        c = self.config
        if c.alpha < 0:
            raise ConfigError(f"pai: alpha must be >= 0, got {c.alpha}")
        check_guidance("pai", c.gamma, c.cutoff, c.reading)

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        start_guidance(self, self.data(state), state, inputs, self.config.gamma)

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        c = self.config
        if c.alpha <= 0 or layer not in self.layers or not amplifies(c.reading, c.gamma, state):
            return []
        return [_Amplify(state, c.alpha)] if state.visual.any() else []

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return guided_logits(self.data(state), state, logits, inputs, self.config.gamma, self.config.cutoff)


def check_guidance(name: str, gamma: float, cutoff: float | None, reading: str) -> None:
    if not gamma > 0:
        raise ConfigError(f"{name}: gamma must be > 0 (1: no CFG), got {gamma}")
    if cutoff is not None and not 0.0 < cutoff <= 1.0:
        raise ConfigError(f"{name}: cutoff must be in (0, 1] or None, got {cutoff}")
    if reading not in ("released", "text"):
        raise ConfigError(f"{name}: reading must be 'released' or 'text', got {reading!r}")


def amplifies(reading: str, gamma: float, state: State) -> bool:
    """Whether the attention patch acts at this step: the released code (PAI and its FIA fork) skips it for the
    step that produces the first token when CFG is on (``if use_attn and not use_cfg``; ``use_cfg`` is switched
    off by the CFG processor only after its first call); the paper's text (``"text"``) patches every step."""
    return not (reading == "released" and gamma != 1.0 and state.phase == "prefill")


def start_guidance(method: Method, data: Any, state: State, inputs: dict[str, Any], gamma: float) -> None:
    """Open the no-image prompt's side stream (``data.side``) and its first logits (``data.last``) for CFG;
    nothing at gamma = 1 (the unchanged model, as in the released code)."""
    if gamma == 1.0:
        return
    pad = method.adapter.text_config.pad_token_id
    data.side = method.host.side_stream(text_only_inputs(state, inputs, 0 if pad is None else int(pad)))
    data.last = data.side.begin()


def guided_logits(data: Any, state: State, logits: torch.Tensor, inputs: dict[str, Any], gamma: float,
                  cutoff: float | None) -> torch.Tensor:
    """``logits`` with the last position replaced by the CFG of :func:`cfg_logits` (the side stream decodes the
    same token first); unchanged without a side stream."""
    if data.side is None:
        return logits
    if state.phase == "decode":
        data.last = data.side.step(inputs["input_ids"])
    return last_position_logits(logits, cfg_logits(logits[:, -1], data.last, gamma, cutoff))


register_method(PAIConfig, PAI)
