"""VHR: vision-aware head reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025; no official code found).

At the first generation step (the prefill's last prompt row) the output of every attention head h (before
``o_proj``) is compared with and without the image; the no-image prompt (the image tokens removed) runs as a
second stream in lock-step with the main prefill, one decoder layer at a time, so layer l sees the
reinforcement chosen for layers < l in both streams ("layer by layer")::

    VHD_h = || o_h(image, text) - o_h(text) ||_2          T_h = || o_h(text) ||_2
    outlier_h   = VHD_h > mean(VHD) + std(VHD)  and  T_h > mean(T) + std(T)      (over the layer's heads)
    reinforce_h = not outlier_h  and  VHD_h > median_h(VHD)
    o_h <- alpha * o_h for reinforced heads (alpha = 2), in prefill and every decode step

per sample, on the configured layers (LLaVA-1.5: 1 and 18..31, the only layers the paper gives). A model without
layers (Qwen2-VL / Qwen2.5-VL) is refused unless ``layers`` are passed or ``all_layers`` asks for every layer
(our extension, not the paper). Reinforcement is a head-output scale, so the
attention itself stays SDPA. Cost: one extra prefill of the no-image prompt (text only, so shorter), reported
as ``handle.stats["vhr_extra_ms"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import text_only_inputs


@dataclass(frozen=True)
class VHRConfig(MethodConfig):
    method = "vhr"
    alpha: float = 2.0
    layers: tuple[int, ...] | None = None  # 0-based decoder layers; None: none given (refused unless all_layers)
    layers_of: int = 0  # decoder depth ``layers`` are written for (scaled to the model's depth); 0: absolute
    all_layers: bool = False  # our extension: reinforce every layer of a model the paper gives no layers for


def effective_layers(config: VHRConfig, n_layers: int) -> tuple[int, ...] | None:
    """The layers VHR reinforces on an ``n_layers`` decoder (paper layers of a deeper model scaled down)."""
    if config.layers is None:
        return None
    if config.layers_of <= 0 or config.layers_of == n_layers:
        return tuple(config.layers)
    scaled = (min(n_layers - 1, round(i * n_layers / config.layers_of)) for i in config.layers)
    return tuple(sorted(set(scaled)))


def head_divergence(with_image: torch.Tensor, text_only: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(VHD, T) [B, H] from per-head outputs [B, H, d] of the last row with and without the image."""
    return (with_image.float() - text_only.float()).norm(dim=-1), text_only.float().norm(dim=-1)


def reinforced_heads(vhd: torch.Tensor, text_norm: torch.Tensor) -> torch.Tensor:
    """[B, H] bool: heads above the layer's median VHD, outlier heads (VHD and T both above mean + std)
    excluded."""
    def high(x: torch.Tensor) -> torch.Tensor:
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True)

    outlier = high(vhd) & high(text_norm)
    return ~outlier & (vhd > vhd.quantile(0.5, dim=-1, keepdim=True))


@dataclass
class _Data:
    scale: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H] head factors (prefill decision)
    hidden: torch.Tensor | None = None  # prefill: the no-image stream's input to the next layer
    kwargs: dict[str, Any] = field(default_factory=dict)  # its layer arguments (mask, positions)
    ms: float = 0.0  # wall time of the no-image stream


class VHR(Method):
    points = frozenset({Point.LAYER})
    Data = _Data

    config: VHRConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        if c.layers is None and not c.all_layers:
            raise ConfigError("vhr: no layers for this model: the paper gives them for LLaVA-1.5 only (1, 18..31 of "
                              "32); pass layers=[...] (0-based), or all_layers=true for every layer (our extension, "
                              "not the paper)")
        if c.layers is not None and c.all_layers:
            raise ConfigError("vhr: give layers or all_layers, not both")
        layers = effective_layers(c, n_layers)
        if layers is not None and not all(0 <= i < n_layers for i in layers):
            raise ConfigError(f"vhr: layers {list(layers)} outside [0, {n_layers - 1}]")
        if c.alpha <= 0:
            raise ConfigError(f"vhr: alpha must be > 0, got {c.alpha}")
        self.heads = self.adapter.text_config.num_attention_heads
        self.active = set(range(n_layers) if layers is None else layers)

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        pad = self.adapter.text_config.pad_token_id
        side = text_only_inputs(state, inputs, 0 if pad is None else int(pad))
        side["position_ids"] = self.adapter.prefill_position_ids(side, side["attention_mask"])
        data: _Data = self.data(state)
        data.hidden, data.kwargs = self.host.decoder_inputs(side)
        data.ms = (time.perf_counter() - t0) * 1e3

    def observe_heads(self, layer: int, state: State, heads: torch.Tensor) -> None:
        """Prefill, main stream at ``layer``: run the no-image stream's ``layer`` and decide its heads there."""
        data: _Data = self.data(state)
        if state.phase != "prefill" or data.hidden is None:
            return
        t0 = time.perf_counter()
        main_last = heads[:, -1].view(heads.shape[0], self.heads, -1)

        def side_heads(x: torch.Tensor) -> torch.Tensor | None:
            if layer in self.active:
                vhd, t = head_divergence(main_last, x[:, -1].view(x.shape[0], self.heads, -1))
                data.scale[layer] = torch.where(reinforced_heads(vhd, t), self.config.alpha, 1.0)
            scale = data.scale.get(layer)
            if scale is None:
                return None
            return (x.view(*x.shape[:-1], self.heads, -1) * scale.to(x.dtype)[:, None, :, None]).view_as(x)

        data.hidden = self.host.run_layer(layer, data.hidden, data.kwargs, heads=side_heads)
        if layer == len(self.adapter.layers) - 1:
            data.hidden, data.kwargs = None, {}
        data.ms += (time.perf_counter() - t0) * 1e3

    def head_scale(self, layer: int, state: State) -> torch.Tensor | None:
        return self.data(state).scale.get(layer)

    def stats(self, state: State) -> dict[str, Any]:
        return {"vhr_extra_ms": self.data(state).ms}


register_method(VHRConfig, VHR)
