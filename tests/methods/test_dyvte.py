"""DyVTE: per-sample exits remove exactly the visual spans at the chosen layer (every family, batched), and
generation after the exit equals a slow reference; the real routers on the model's own hidden states decide
the exits that an independent computation (features, MLP and threshold written out) predicts; router features,
label builder, training steps, the paper's training options (warm-up, one exit layer per step)."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

import mmeff
from mmeff.errors import ConfigError, MmeffError
from mmeff.families import adapter_for
from mmeff.heads import save_head
from mmeff.methods._teacher import make_batch
from mmeff.methods.dyvte.method import DyVTE, DyVTERouters, router_features, text_after_image
from mmeff.methods.dyvte.train import exit_labels, head_tensors, train_dyvte, warmup_cosine
from mmeff_lab.models.factory import load_tiny
from mmeff_lab.training.data import synthetic_examples
from tests.helpers import batch, masked_keys_generate, visual_mask


def save_routers(path, model, width: int = 8, seed: int = 0, scale: float = 1.0):
    """Random routers; ``scale`` multiplies their weights (the tiny models' states are small, |h| ~ 0.2: at
    scale 1 every p_exit is 0.5 +- 0.01 and a feature error would hardly move it)."""
    a = adapter_for(model)
    torch.manual_seed(seed)
    routers = DyVTERouters(int(a.text_config.hidden_size), len(a.layers), width)
    with torch.no_grad():
        for par in routers.parameters():
            par.mul_(scale)
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


def check_exits_and_generation(family, eager, sdpa, inputs, visual, exits, wrap_and_generate, steps: int = 4):
    """Generation equals the slow reference with sample b's visual tokens hidden from layer exits[b]; the stats
    and the KV-cache lengths show exactly those tokens removed. Returns the handle."""
    n_layers = len(adapter_for(eager).layers)
    ref_ids, ref_logits = reference_generate(eager, inputs, visual, exits, steps)
    handle, out = wrap_and_generate(steps)
    assert torch.equal(out.sequences, ref_ids), family
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert handle.stats["exit_layers"] == exits
    n_vis = visual.sum(1)
    per_layer = handle.stats["visual_tokens_kept_per_layer"]
    want = [float(sum(int(n_vis[b]) * (k < exits[b]) for b in range(len(exits)))) / len(exits)
            for k in range(n_layers)]
    assert per_layer == pytest.approx(want)
    # a layer stores the longest sample's kept slots (ragged batch): the removed count is the smallest drop
    n = inputs["input_ids"].shape[1]
    for k, layer in enumerate(out.past_key_values.layers):
        removed = min(int(n_vis[b]) * (k >= exits[b]) for b in range(len(exits)))
        assert layer.keys.shape[-2] == n + steps - 1 - removed, (family, k)
    return handle


@torch.no_grad()
def test_exit_removes_visual_spans_and_generation_equals_reference(models, tmp_path):
    family, eager, sdpa, processor = models
    inputs = batch(processor, family)
    visual = visual_mask(eager, inputs)
    exits = [1, 3]  # sample 0 leaves its image after layer 0, sample 1 after layer 2
    ckpt = save_routers(tmp_path / "dyvte.safetensors", sdpa)
    asked: list[list[tuple[int, int]]] = []

    def run(steps):
        with mmeff.wrap(sdpa, "dyvte", checkpoint=str(ckpt)) as handle:
            asked.append(force_exits(handle.pipeline.methods[0], exits))
            out = sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        return handle, out

    check_exits_and_generation(family, eager, sdpa, inputs, visual, exits, run)
    # routers asked in layer order while some sample still held its image, never at decode
    assert [a[0] for a in asked[0]] == [1, 2, 3]


def explicit_exit_probabilities(eager, inputs, visual, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] p_exit of sample b before layer k (column 0 unused) from the unwrapped model's
    ``output_hidden_states`` and the checkpoint's raw tensors, features and router MLP written out:
    f = [mean of the real tokens after the last image, before the last position; state of the last position],
    p = softmax(W2 gelu(W1 f))[1]."""
    hs = eager(**inputs, output_hidden_states=True, use_cache=False).hidden_states  # hs[k]: input of layer k
    n_b, n = visual.shape
    n_layers = len(hs) - 1
    p = torch.zeros(n_b, n_layers)
    mask = inputs["attention_mask"]
    for b in range(n_b):
        last_vis = max(j for j in range(n) if visual[b, j])
        text = [j for j in range(last_vis + 1, n - 1) if mask[b, j]]
        for k in range(1, n_layers):
            h = hs[k][b].double()
            mean = sum(h[j] for j in text) / len(text) if text else h[n - 1]
            f = torch.cat([mean, h[n - 1]])
            w1, w2 = (weights[f"routers.{k - 1}.{i}.weight"].double() for i in (0, 2))
            logits = w2 @ torch.nn.functional.gelu(w1 @ f)
            p[b, k] = torch.softmax(logits, 0)[1].float()
    return p


@torch.no_grad()
def test_real_routers_decide_exits_from_hidden_states(models, tmp_path):
    """No monkeypatch: the trained-head path (checkpoint -> routers -> features of the live hidden states ->
    threshold -> removal) against exits computed independently from ``output_hidden_states``."""
    family, eager, sdpa, processor = models
    inputs = batch(processor, family)
    visual = visual_mask(eager, inputs)
    n_layers = len(adapter_for(eager).layers)
    ckpt = save_routers(tmp_path / "dyvte.safetensors", sdpa, seed=3, scale=8.0)
    p = explicit_exit_probabilities(eager, inputs, visual, load_file(str(ckpt)))

    def exits_at(t: float) -> list[int]:
        return [next((k for k in range(1, n_layers) if p[b, k] > t), n_layers) for b in range(p.shape[0])]

    # a threshold far from every probability (robust to SDPA vs eager rounding) that lets the samples leave at
    # different layers, at least one before the last layer
    values = sorted(p[:, 1:].flatten().tolist())
    candidates = [(a + b) / 2 for a, b in itertools.pairwise(values)]

    def margin(t: float) -> float:
        return min(abs(v - t) for v in values)

    good = [t for t in candidates if len(set(exits_at(t))) == 2 and min(exits_at(t)) < n_layers]
    assert good, p
    threshold = max(good, key=margin)
    assert margin(threshold) > 1e-4, (threshold, p)
    exits = exits_at(threshold)

    def run(steps):
        with mmeff.wrap(sdpa, "dyvte", checkpoint=str(ckpt), threshold=threshold) as handle:
            out = sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        return handle, out

    check_exits_and_generation(family, eager, sdpa, inputs, visual, exits, run)
    # each probability pinned to 1e-4: a threshold just below / above it moves the exits as the reference says
    delta = 1e-4
    probes = [t for v in values for t in (v - delta, v + delta) if margin(t) > delta / 2]
    assert len(probes) >= len(values)
    for t in probes:
        with mmeff.wrap(sdpa, "dyvte", checkpoint=str(ckpt), threshold=t) as handle:
            sdpa(**inputs)
        assert handle.stats["exit_layers"] == exits_at(t), (family, t)


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


def test_warmup_cosine_schedule():
    # 100 steps, 3% warm-up: 3 linear steps from 0 (transformers' schedule), then cosine from the full rate to 0
    f = warmup_cosine(100, 0.03)
    assert [f(s) for s in range(4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert f(3 + 97 // 2) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 48 / 97)).item()))
    assert f(100) == pytest.approx(0.0)
    g = warmup_cosine(10)  # no warm-up: the plain cosine of before
    assert [g(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(MmeffError, match="warmup is a share of the steps in"):
        warmup_cosine(10, 1.0)


def test_one_exit_layer_per_step_trains_only_that_router(tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir("llava"))
    torch.manual_seed(0)
    init = DyVTERouters(int(adapter_for(model).text_config.hidden_size), len(adapter_for(model).layers), 8)
    routers, report = train_dyvte(model, processor, synthetic_examples(0), steps=1, batch_size=2, width=8, lr=1e-2,
                                  exit_layers="one", warmup=0.0)
    changed = [k for k in range(1, routers.num_layers)
               if not torch.equal(routers.routers[k - 1][0].weight, init.routers[k - 1][0].weight)]
    labelled = [k for k, rate in report["exit_label_rate"].items() if rate is not None]
    assert len(changed) == 1 and changed == labelled and report["exit_layers"] == "one"
    with pytest.raises(MmeffError, match="exit_layers must be one of all, one, got 'some'"):
        train_dyvte(model, processor, synthetic_examples(0), steps=1, exit_layers="some")
