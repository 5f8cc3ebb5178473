"""VAR on the reference models: the shipped presets resolve both 256-wide reference decoders, which have no
massive activations, so VAR refuses them clearly; sink_dim_stats tells real sink dims from always-large dims."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmeff
from mmeff.families import adapter_for
from mmeff.methods import var  # noqa: F401  (registration)
from mmeff.methods.var import discover_sink_dims, sink_dim_stats, text_model_key
from mmeff.presets import get_preset
from mmeff_lab.models.factory import load_tiny, random_image
from mmeff_lab.reference.model import load_reference
from mmeff_lab.reference.synthetic import TRAIN_SEEDS
from mmeff_lab.reference.training import render_scene

FAMILY = {"llava": "llava", "qwen2vl": "qwen2_vl"}


def _samples() -> list[tuple[str, Image.Image]]:
    # Calibration scenes from the training split, never benchmark seeds.
    return [("Please describe this image in detail.", Image.fromarray(render_scene(TRAIN_SEEDS[s], draws=1)[0]))
            for s in (11, 3333)]


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
@torch.no_grad()
def test_reference_decoders_have_no_sink_dims_and_var_refuses(arch):
    model, processor = load_reference(arch=arch)
    cfg = get_preset("var").config(FAMILY[arch])
    assert cfg.sink_dims_by_model[text_model_key(model.config.text_config)] == []  # checked: none
    samples = _samples()
    dims = discover_sink_dims(model, processor, samples, k=2)
    stats = sink_dim_stats(model, processor, samples, dims)
    # No massive activation: the top dims are large on every token (max ~ median), BOS is no outlier, and no
    # token gets near tau (the score cannot exceed sqrt(256) = 16 anyway).
    assert stats["bound"] == 16.0
    assert stats["max"] < 13.0 < cfg.tau
    assert stats["ratio"] < 1.5
    assert stats["first"] < stats["typical"]
    with pytest.raises(mmeff.ConfigError, match=r"text model \(.*:256x6:.*\) has no sink dimensions .*refused"):
        mmeff.wrap(model, "var")
    with pytest.raises(mmeff.ConfigError, match=r"tau 20.0 is unreachable on a 256-wide decoder"):
        mmeff.wrap(model, "var", sink_dims=dims)
    with mmeff.wrap(model, "var", sink_dims=dims, tau=8.0):  # the refusals left nothing attached
        pass


@torch.no_grad()
def test_sink_dim_stats_finds_a_planted_massive_activation(tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir("llava"))
    samples = [("describe the picture", random_image(5))]
    before = sink_dim_stats(model, processor, samples, [7])

    def plant(module, args, kwargs):  # BOS carries a massive activation in dim 7 from layer 1 on
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden[:, 0, 7] = 1e4

    layers = adapter_for(model).layers
    hooks = [layer.register_forward_pre_hook(plant, with_kwargs=True) for layer in layers[1:]]
    try:
        after = sink_dim_stats(model, processor, samples, [7])
        dims = discover_sink_dims(model, processor, samples, k=1)
    finally:
        for h in hooks:
            h.remove()
    assert dims == [7]
    assert after["first"] == pytest.approx(after["bound"], rel=1e-3) == after["max"]  # all energy in dim 7
    assert before["ratio"] < 5 < 10 < after["ratio"]  # a random dim is no sink; the planted one stands out
    assert before["first"] < 0.5 * before["bound"]
