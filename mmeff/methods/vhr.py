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

per sample, on the configured layers (LLaVA-1.5: 1 and 18..31). Reinforcement is a head-output scale, so the
attention itself stays SDPA. Cost: one extra prefill of the no-image prompt (text only, so shorter), reported
as ``handle.stats["vhr_extra_ms"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mmeff.config import MethodConfig, register_method
from mmeff.engine.method import Method, Point
from mmeff.engine.pipeline import Pipeline
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import text_only_inputs, text_positions


@dataclass(frozen=True)
class VHRConfig(MethodConfig):
    method = "vhr"
    alpha: float = 2.0
    layers: tuple[int, ...] | None = None  # 0-based decoder layers; None: all
    layers_of: int = 0  # decoder depth ``layers`` are written for (scaled to the model's depth); 0: absolute


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


class _Stop(Exception):
    """Ends the no-image forward once decoder layer 0's inputs are captured."""


class VHR(Method):
    points = frozenset({Point.LAYER})

    config: VHRConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        layers = effective_layers(c, n_layers)
        if layers is not None and not all(0 <= i < n_layers for i in layers):
            raise ConfigError(f"vhr: layers {list(layers)} outside [0, {n_layers - 1}]")
        if c.alpha <= 0:
            raise ConfigError(f"vhr: alpha must be > 0, got {c.alpha}")
        self.heads = self.adapter.text_config.num_attention_heads
        self.active = set(range(n_layers) if layers is None else layers)
        self._side = False

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        for i, layer in enumerate(self.adapter.layers):
            o_proj = self.adapter.attention(layer).o_proj
            # prepend: runs before the pipeline's head-scale hook, so head_scale() finds this layer's decision
            pipeline.add_hook(o_proj.register_forward_pre_hook(self._observe(i, layer), prepend=True))
        pipeline.add_hook(pipeline.model.register_forward_hook(self._report))

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        pad = self.adapter.text_config.pad_token_id
        side = text_only_inputs(state, inputs, 0 if pad is None else int(pad))
        captured: dict[str, Any] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.pipeline.suspended(), torch.no_grad():
                self.pipeline.model(**side, position_ids=text_positions(side["attention_mask"]), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        state.scratch["vhr"] = {"hidden": captured["hidden"], "kwargs": captured["kwargs"], "scale": {},
                                "ms": (time.perf_counter() - t0) * 1e3}

    def _observe(self, i: int, layer: torch.nn.Module):
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if self._side:  # the no-image stream's own o_proj: decide, then scale it the same way
                data = self._data
                x = args[0]
                if i in self.active:
                    heads = x[:, -1].view(x.shape[0], self.heads, -1)
                    vhd, t = head_divergence(data["main_last"], heads)
                    data["scale"][i] = torch.where(reinforced_heads(vhd, t), self.config.alpha, 1.0)
                scale = data["scale"].get(i)
                if scale is None:
                    return None
                y = x.view(*x.shape[:-1], self.heads, -1) * scale.to(x.dtype)[:, None, :, None]
                return (y.view_as(x), *args[1:])
            st = self.pipeline.state
            if st is None or st.phase != "prefill" or "vhr" not in st.scratch:
                return None
            data = st.scratch["vhr"]
            if "hidden" not in data:
                return None
            t0 = time.perf_counter()
            x = args[0]
            data["main_last"] = x[:, -1].view(x.shape[0], self.heads, -1)
            self._data, self._side = data, True
            try:
                with self.pipeline.suspended(), torch.no_grad():
                    out = layer(data["hidden"], **data["kwargs"])
            finally:
                self._side = False
            data["hidden"] = out[0] if isinstance(out, tuple) else out
            if i == len(self.adapter.layers) - 1:
                for key in ("hidden", "kwargs", "main_last"):
                    data.pop(key, None)
            data["ms"] += (time.perf_counter() - t0) * 1e3
            return None

        return hook

    def head_scale(self, layer: int, state: State) -> torch.Tensor | None:
        data = state.scratch.get("vhr")
        return None if data is None else data["scale"].get(layer)

    def _report(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        st = self.pipeline.state
        if st is not None and "vhr" in st.scratch:
            self.pipeline.stats["vhr_extra_ms"] = st.scratch["vhr"]["ms"]


register_method(VHRConfig, VHR)
