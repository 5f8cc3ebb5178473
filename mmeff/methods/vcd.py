"""VCD baseline (Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through
Visual Contrastive Decoding", CVPR 2024; official code DAMO-NLP-SG/VCD).

A second sequence, the same prompt with a diffusion-noised image, decodes in lock-step (own KV cache). The
noise is the forward diffusion process on the processed pixels at step ``noise_step`` (500 of 1000; betas =
sigmoid(linspace(-6, 6)) scaled to [1e-5, 5e-3])::

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

Contrast with the adaptive plausibility constraint, on the last position's logits::

    l_vcd = (1 + alpha) l - alpha l_noised,   set to -inf where l < log(beta) + max l     (alpha = 1, beta = 0.1)

alpha = 0 keeps the model's greedy choice (the maximum is never cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.side_stream import SideStream
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import last_position_logits

# inputs of the main prompt that the noised stream reuses as they are
_SHARED = ("input_ids", "attention_mask", "image_sizes", "image_grid_thw", "mm_token_type_ids")


@dataclass(frozen=True)
class VCDConfig(MethodConfig):
    method = "vcd"
    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    seed: int = 0


def add_diffusion_noise(pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """VCD's noised image: the forward diffusion of ``pixels`` to ``step`` (of 1000), noise from ``generator``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[step]
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return math.sqrt(abar) * pixels + math.sqrt(1 - abar) * noise


def contrast(logits: torch.Tensor, noised: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD's contrastive logits on [B, V] (float32)."""
    logits, noised = logits.float(), noised.float()
    cutoff = math.log(beta) + logits.amax(-1, keepdim=True)
    return ((1 + alpha) * logits - alpha * noised).masked_fill(logits < cutoff, float("-inf"))


@dataclass
class _Data:
    side: SideStream | None = None  # the prompt with the noised image, None without an image
    last: torch.Tensor | None = None  # its last logits [B, V]


class VCD(Method):
    points = frozenset({Point.LOGITS})
    Data = _Data

    config: VCDConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 0 <= c.noise_step < 1000:
            raise ConfigError(f"vcd: noise_step must be in [0, 999], got {c.noise_step}")
        if not 0.0 < c.beta <= 1.0:
            raise ConfigError(f"vcd: beta must be in (0, 1], got {c.beta}")

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        pixels = inputs.get("pixel_values")
        if pixels is None:  # no image: nothing to contrast against
            return
        side_inputs = {k: inputs[k] for k in _SHARED if inputs.get(k) is not None}
        generator = torch.Generator().manual_seed(self.config.seed)
        side_inputs["pixel_values"] = add_diffusion_noise(pixels, self.config.noise_step, generator)
        data: _Data = self.data(state)
        data.side = self.host.side_stream(side_inputs)
        data.last = data.side.begin()

    def process_logits(self, state: State, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        data: _Data = self.data(state)
        if data.side is None:
            return logits
        if state.phase == "decode":
            data.last = data.side.step(inputs["input_ids"])
        c = self.config
        return last_position_logits(logits, contrast(logits[:, -1], data.last, c.alpha, c.beta))


register_method(VCDConfig, VCD)
