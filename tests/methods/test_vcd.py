"""VCD against an independent slow reference written from the released code's logic (DAMO-NLP-SG/VCD,
``vcd_utils/vcd_add_noise.py`` and ``vcd_sample.py``): the noised image as the release makes it (float32 betas,
``randn_like`` from the global generator seeded like ours), both prompts recomputed in full at every step, the
contrast and its plausibility cutoff on raw logits written out here."""

from __future__ import annotations

import math

import pytest
import torch

import mmeff
from tests.helpers import batch
from tests.methods.cfg_reference import peaky, reference_logits, step_inputs

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def released_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)
    torch.manual_seed(seed)
    noise = torch.randn_like(pixels.float())
    return (torch.sqrt(abar)[step] * pixels.float() + torch.sqrt(1 - abar)[step] * noise).to(pixels.dtype)


def released_contrast(logits: torch.Tensor, noised: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * logits - alpha * noised).masked_fill(logits < cutoff, -float("inf"))


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_vcd_equals_the_released_logic(models, alpha):
    family, eager, _, processor = models
    inputs = batch(processor, family, multi_image=False)
    noised_inputs = dict(inputs, pixel_values=released_noise(inputs["pixel_values"], 500, 0))
    with peaky(eager, 8.0):  # a sharper distribution, so the cutoff removes tokens
        with mmeff.wrap(eager, "vcd", alpha=alpha) as handle:
            assert (handle.configs[0].beta, handle.configs[0].noise_step) == (0.1, 500)
            out = eager.generate(**inputs, **GEN)
        n = inputs["input_ids"].shape[1]
        cut = 0
        for step in range(GEN["max_new_tokens"]):
            new = out.sequences[:, n: n + step]
            main = reference_logits(eager, step_inputs(inputs, new))
            noised = reference_logits(eager, step_inputs(noised_inputs, new))
            want = released_contrast(main, noised, alpha, 0.1)
            got = out.logits[step].float()
            fin = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), fin), (family, step)
            cut += int((~fin).sum())
            torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
            assert torch.equal(out.sequences[:, n + step], want.argmax(-1))  # greedy on the contrast
    assert cut > 0
