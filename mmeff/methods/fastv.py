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

from mmeff.config import MethodConfig, register_method
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point
from mmeff.engine.state import State
from mmeff.errors import ConfigError


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    method = "fastv"
    k: int = 2
    ratio: float = 0.5
    query: Literal["all", "last"] = "all"


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, L] keep mask: every non-candidate, plus per row the round(n * (1 - ratio)) highest-scoring candidates
    (ties broken towards the earlier position)."""
    n_keep = torch.round(candidates.sum(1).double() * (1.0 - ratio)).long()
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return ~candidates | (rank < n_keep[:, None])


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


class _Collect:
    def __init__(self, state: State, mode: str) -> None:
        self.state, self.mode = state, mode

    def observe(self, call: AttentionCall) -> None:
        self.state.scratch["fastv"] = call.received(query_weights(self.state, self.mode))


class FastV(Method):
    points = frozenset({Point.LAYER})
    graphable = True

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
            return [_Collect(state, self.config.query)]
        return []

    def select(self, layer: int, state: State, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer != self.config.k:
            return None
        scores = state.scratch.pop("fastv")
        return keep_top(scores, state.prunable_in_group(state.group), self.config.ratio)


register_method(FastVConfig, FastV)
