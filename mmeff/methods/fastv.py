"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

After the first ``k`` decoder layers, rank visual tokens by the attention they receive in layer ``k``
(1-based; 0-based index ``k - 1``), averaged over heads and over the query rows, and drop the lowest
``ratio`` of them for all later layers and all decode steps::

    r_j = mean_{h} mean_{i in Q} softmax(q_i^h . k_j^h / sqrt(d) + mask)_j      Q: all real prompt rows
                                                                                  ("all", the paper) or the
                                                                                  last row ("last", the code)
    keep per sample the round(n_vis * (1 - ratio)) visual tokens of largest r_j.

Kept tokens keep their original position ids; text tokens and layout tokens are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.ranking import keep_top_of_state
from mmeff.engine.state import State
from mmeff.errors import ConfigError


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    method = "fastv"
    k: int = 2
    ratio: float = 0.5
    query: Literal["all", "last"] = "all"


def query_weights(state: State, mode: str) -> torch.Tensor:
    """[B, L] weights of the current slots as queries: real (non-padding, valid) rows, or only the last row."""
    g = state.group
    real = g.valid.clone()
    if state.attention_mask is not None:
        real &= torch.gather(state.attention_mask.bool(), 1, g.index)
    if mode == "last":
        real = torch.zeros_like(real)
        real[:, -1] = True
    return real.float()


@dataclass
class _Data:
    scores: torch.Tensor | None = None  # [B, L] attention received in layer k - 1, until the selection


class _Collect:
    def __init__(self, data: _Data, state: State, mode: str) -> None:
        self.data, self.state, self.mode = data, state, mode

    def observe(self, call: AttentionCall) -> None:
        self.data.scores = call.received(query_weights(self.state, self.mode))


class FastV(Method):
    points = frozenset({Point.LAYER})
    graphable = True
    Data = _Data

    config: FastVConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 1 <= c.k < n_layers:
            raise ConfigError(f"fastv: k must be in [1, {n_layers - 1}] for a {n_layers}-layer decoder, got {c.k}")
        if not 0.0 <= c.ratio <= 1.0:
            raise ConfigError(f"fastv: ratio must be in [0, 1], got {c.ratio}")
        if c.query not in ("all", "last"):
            raise ConfigError(f"fastv: query must be 'all' or 'last', got {c.query!r}")

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        if state.phase == "prefill" and layer == self.config.k - 1:
            return [_Collect(self.data(state), state, self.config.query)]
        return []

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer != self.config.k:
            return None
        data: _Data = self.data(state)
        scores, data.scores = data.scores, None
        return keep_top_of_state(state, scores, self.config.ratio)


register_method(FastVConfig, FastV)
