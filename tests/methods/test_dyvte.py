"""DyVTE: per-sample exits remove exactly the visual spans at the chosen layer (every family, batched), and
generation after the exit equals a slow reference; router features, label builder, training steps."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.errors import ConfigError
from mmeff.families import adapter_for
from mmeff.heads import save_head
from mmeff.methods._teacher import make_batch
from mmeff.methods.dyvte.method import DyVTE, DyVTERouters, router_features, text_after_image
from mmeff.methods.dyvte.train import exit_labels, head_tensors, train_dyvte
from mmeff_lab.models.factory import load_tiny
from mmeff_lab.training.data import synthetic_examples
from tests.helpers import batch, masked_keys_generate, visual_mask


def save_routers(path, model, width: int = 8, seed: int = 0):
    a = adapter_for(model)
    torch.manual_seed(seed)
    routers = DyVTERouters(int(a.text_config.hidden_size), len(a.layers), width)
    meta = {"kind": "dyvte", "family": a.family, "model": "tiny", "hidden_size": routers.hidden_size,
            "num_layers": routers.num_layers, "width": width}
    return save_head(path, head_tensors(routers), meta)


def reference_generate(model, inputs, visual: torch.Tensor, exits: list[int], steps: int):
    """Greedy decoding, full recompute per step; sample b's visual tokens hidden (as keys) from layer exits[b]."""
    return masked_keys_generate(model, inputs, lambda k: visual & (torch.tensor(exits)[:, None] <= k), steps)


def force_exits(method: DyVTE, exits: list[int]) -> list[tuple[int, int]]:
    """Make the routers say 'exit' for sample b from layer exits[b] on; records the (layer, batch) asked."""
    asked = []

    def prob(layer, features):
        asked.append((layer, features.shape[0]))
        return torch.tensor([1.0 if layer >= e else 0.0 for e in exits])

    method.exit_probability = prob
    return asked


@torch.no_grad()
def test_exit_removes_visual_spans_and_generation_equals_reference(models, tmp_path):
    family, eager, sdpa, processor = models
    inputs = batch(processor, family)
    visual = visual_mask(eager, inputs)
    n_layers = len(adapter_for(eager).layers)
    exits = [1, 3]  # sample 0 leaves its image after layer 0, sample 1 after layer 2
    steps = 4
    ref_ids, ref_logits = reference_generate(eager, inputs, visual, exits, steps)
    ckpt = save_routers(tmp_path / "dyvte.safetensors", sdpa)
    with mmeff.wrap(sdpa, "dyvte", checkpoint=str(ckpt)) as handle:
        method = handle.pipeline.methods[0]
        asked = force_exits(method, exits)
        out = sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
        cache = out.past_key_values
    assert torch.equal(out.sequences, ref_ids), family
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert handle.stats["exit_layers"] == exits
    # routers asked in layer order while some sample still held its image, never at decode
    assert [a[0] for a in asked] == [1, 2, 3]
    n_vis = visual.sum(1)
    per_layer = handle.stats["visual_tokens_kept_per_layer"]
    want = [float(sum(int(n_vis[b]) * (k < exits[b]) for b in range(2))) / 2 for k in range(n_layers)]
    assert per_layer == pytest.approx(want)
    # a layer stores the longest sample's kept slots (ragged batch): the removed count is the smallest drop
    n = inputs["input_ids"].shape[1]
    for k, layer in enumerate(cache.layers):
        removed = min(int(n_vis[b]) * (k >= exits[b]) for b in range(2))
        assert layer.keys.shape[-2] == n + steps - 1 - removed, (family, k)


def test_router_features_and_text_mask():
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1] * 6, [1] * 6, [1] * 6])
    text = text_after_image(visual, mask)
    assert text.tolist() == [[False, False, False, True, True, False], [False, False, True, True, True, False],
                             [False] * 6]
    hidden = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    f = router_features(hidden, text, torch.tensor([5, 5, 5]))
    assert f[0].tolist() == [7.0, 8.0, 10.0, 11.0]  # mean of rows 3-4, then row 5
    assert f[1].tolist() == [18.0, 19.0, 22.0, 23.0]  # mean of rows 2-4
    assert f[2].tolist() == [34.0, 35.0, 34.0, 35.0]  # no text after the image: the last token's state
    routers = DyVTERouters(2, 4, 8)
    assert len(routers.routers) == 3 and routers(3, f).shape == (3, 2)
    assert all(lin.bias is None for r in routers.routers for lin in (r[0], r[2]))
    with pytest.raises(IndexError):
        routers(0, f)


def test_exit_labels_hand_made():
    # vocabulary of 3, two answer rows (positions 1 and 2) per sample, 3 samples
    full = torch.tensor([[0, 0, 0], [2.0, 0, 0], [0, 3.0, 0], [0, 0, 0]]).expand(3, 4, 3).clone()
    gone = full.clone()
    gone[1, 2] = torch.tensor([0, 0, 3.0])  # sample 1: second answer token changes -> agreement 0.5
    gone[2, 1] = torch.tensor([1.0, 0, 0])  # sample 2: same argmax, but a much worse loss
    rows = torch.tensor([[0, 1, 1, 0]] * 3, dtype=torch.bool)
    targets = torch.tensor([[0, 0, 1, 0]] * 3)
    labels, info = exit_labels(full, gone, rows, targets)
    assert labels.tolist() == [1, 0, 0]
    assert info["agreement"].tolist() == [1.0, 0.5, 1.0]
    lf = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(info["loss_full"][0], lf)
    assert info["loss_exit"][2] > 1.03 * info["loss_full"][2]
    # within tolerance: a loss 2% higher still counts as a harmless exit
    labels, _ = exit_labels(full, gone, rows, targets, tol=10.0)
    assert labels.tolist() == [1, 0, 1]
    # absolute slack: just above / below the loss rise of sample 2; agreement still gates sample 1
    rise = float(info["loss_exit"][2] - 1.03 * info["loss_full"][2])
    assert exit_labels(full, gone, rows, targets, abs_tol=rise + 1e-4)[0].tolist() == [1, 0, 1]
    assert exit_labels(full, gone, rows, targets, abs_tol=rise - 1e-4)[0].tolist() == [1, 0, 0]


def test_training_steps_change_only_routers_and_load(tiny_model_dir, tmp_path):
    model, processor = load_tiny(tiny_model_dir("llava"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routers, report = train_dyvte(model, processor, synthetic_examples(0), steps=2, batch_size=2, width=8, lr=1e-2)
    assert report["steps"] == 2 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # every step labels every exit layer: all routers are trained from the first step on
    assert sorted(report["exit_label_rate"]) == list(range(1, routers.num_layers))
    assert all(r is not None for r in report["router_train_accuracy"].values())
    fresh = DyVTERouters(routers.hidden_size, routers.num_layers, 8)
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(routers.state_dict().values(), fresh.state_dict().values()))
    meta = {"kind": "dyvte", "family": "llava", "model": "tiny", "hidden_size": routers.hidden_size,
            "num_layers": routers.num_layers, "width": 8}
    ckpt = save_head(tmp_path / "r.safetensors", head_tensors(routers), meta)
    inputs = make_batch(processor, [next(synthetic_examples(1))]).prompt
    with mmeff.wrap(model, "dyvte", checkpoint=str(ckpt)) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        exits = handle.stats["exit_layers"]
    assert len(exits) == 1 and 1 <= exits[0] <= routers.num_layers
    bad = save_head(tmp_path / "bad.safetensors", head_tensors(routers), {**meta, "num_layers": 7})
    with pytest.raises(ConfigError, match=r"bad\.safetensors"):
        mmeff.wrap(model, "dyvte", checkpoint=str(bad))
    with pytest.raises(ConfigError, match="not found"):
        mmeff.wrap(model, "dyvte", checkpoint=str(tmp_path / "missing.safetensors"))
