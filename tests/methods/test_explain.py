"""Explainability-guided pruning: the relevance rule against hand-derived values, the probe against eager
attention maps, the mapper on grids larger than trained on, input-stage pruning against a slow reference,
and the training command end to end."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mmeff
from mmeff.engine.ranking import keep_top
from mmeff.families import adapter_for
from mmeff.heads import save_head
from mmeff.methods._teacher import make_batch
from mmeff.methods.explain.method import (
    Explain,
    RelevanceMapper,
    channels_from_probs,
    normalise,
    predict_relevance,
    probe_weights,
)
from mmeff.methods.explain.train import chefer_rule, eager_text, head_tensors, relevance_and_channels
from mmeff_lab.cli import app
from mmeff_lab.models.factory import FAMILIES, load_tiny
from mmeff_lab.training.data import synthetic_examples
from tests.helpers import batch, visual_mask
from tests.helpers import hidden_tokens_generate as reference_generate


def test_chefer_rule_hand_derived():
    # two layers, two heads, two tokens. Layer 1: products G*A per head [[.2,0],[.3,.4]] and [[0,0],[-.3,.2]]
    a1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.25, 0.75]]])
    g1 = torch.tensor([[[0.2, 5.0], [0.6, 0.8]], [[0.0, 9.0], [-1.2, 4 / 15]]])
    a2 = torch.tensor([[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]])
    g2 = torch.tensor([[[1.0, 0.0], [1.0, 0.5]], [[0.0, 0.0], [-1.0, 1.0]]])
    # mean_h (G*A)^+: layer 1 -> [[.1, 0], [.15, .3]]; layer 2 -> [[.5, 0], [.1, .4]]
    r = chefer_rule([a1[None], a2[None]], [g1[None], g2[None]])[0]
    r1 = torch.tensor([[1.1, 0.0], [0.15, 1.3]])  # I + cam1
    want = r1 + torch.tensor([[0.5, 0.0], [0.1, 0.4]]) @ r1  # [[1.65, 0], [0.32, 1.82]]
    torch.testing.assert_close(r, want)
    torch.testing.assert_close(r, torch.tensor([[1.65, 0.0], [0.32, 1.82]]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_probe_channels_equal_eager_attention_and_relevance_is_nonnegative(tiny_model_dir, tmp_path, family):
    model, processor = load_tiny(tiny_model_dir(family))
    b = make_batch(processor, [next(synthetic_examples(s)) for s in (1, 2)])
    rel, channels, visual = relevance_and_channels(model, b)
    assert rel.shape == visual.shape and bool((rel[visual] >= 0).all()) and float(rel[visual].sum()) > 0
    # the inference probe (SDPA model, observe hook) reads the same statistic as the eager maps
    ckpt = save_mapper(tmp_path / "m.safetensors", model)
    seen = {}
    with mmeff.wrap(model, "explain-50", checkpoint=str(ckpt)) as handle:
        method: Explain = handle.pipeline.methods[0]
        original = method.first_layer_channels

        def spy(state, hidden):
            seen["c"] = original(state, hidden)
            return seen["c"]

        method.first_layer_channels = spy
        with torch.no_grad():
            model(**b.prompt)
    n = b.prompt_len
    torch.testing.assert_close(seen["c"], channels[:, :, :n], rtol=1e-4, atol=1e-6)
    # pruned before layer 0: layer 0 itself already ran on the kept tokens only
    assert handle.stats["visual_tokens_kept_per_layer"][0] == handle.stats["visual_tokens_kept"]


def save_mapper(path, model, mapper: RelevanceMapper | None = None):
    a = adapter_for(model)
    torch.manual_seed(0)
    mapper = mapper or RelevanceMapper(4, 2)
    meta = {"kind": "explain", "family": a.family, "model": "tiny", "hidden_size": int(a.text_config.hidden_size),
            "num_layers": len(a.layers), "width": mapper.width, "depth": mapper.depth}
    return save_head(path, head_tensors(mapper), meta)


def test_mapper_is_fully_convolutional_and_generalises_to_larger_grids():
    torch.manual_seed(0)
    blur = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    blur.weight.data.fill_(1 / 9)

    def target(x):  # a local function of the normalised first channel: learnable from small grids
        return normalise(blur(normalise(x)[:, :1]).detach())[:, 0]

    mapper = RelevanceMapper(8, 2)
    opt = torch.optim.Adam(mapper.parameters(), lr=1e-2)
    for _ in range(200):
        x = torch.rand(16, 2, 4, 4) ** 3 + 1e-3
        loss = torch.nn.functional.mse_loss(mapper(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for shape in [(4, 4), (7, 5), (12, 12), (24, 16)]:
        x = torch.rand(3, 2, *shape) ** 3 + 1e-3
        with torch.no_grad():
            pred = mapper(x)
        assert pred.shape == (3, *shape)
        corr = torch.corrcoef(torch.stack([pred.flatten(), target(x).flatten()]))[0, 1]
        assert corr > 0.9, (shape, float(corr))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruning_at_input_equals_slow_reference(tiny_model_dir, tmp_path, family):
    path = tiny_model_dir(family)
    eager, processor = load_tiny(path, attn_implementation="eager")
    sdpa, _ = load_tiny(path, attn_implementation="sdpa")
    inputs = batch(processor, family)
    adapter = adapter_for(eager)
    spans = adapter.spans(inputs["input_ids"], inputs)
    visual = visual_mask(eager, inputs)
    layout = torch.zeros_like(visual)
    for b, sample in enumerate(spans):
        for sp in sample:
            layout[b, sp.start : sp.end] = sp.grid()["layout"]
    torch.manual_seed(1)
    mapper = RelevanceMapper(4, 2)
    ratio = 0.75
    with eager_text(eager):
        att0 = eager(**inputs, output_attentions=True, use_cache=False).attentions[0]
    channels = channels_from_probs(att0, probe_weights(visual, inputs["attention_mask"]))
    keep = keep_top(predict_relevance(mapper, channels, spans), visual & ~layout, ratio)
    steps = 4
    ref_ids, ref_logits = reference_generate(eager, inputs, ~keep, 0, steps)
    ckpt = save_mapper(tmp_path / "m.safetensors", sdpa, mapper)
    with mmeff.wrap(sdpa, "explain-50", checkpoint=str(ckpt), ratio=ratio) as handle:
        out = sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_ids), family
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kept = (visual & keep).sum(1).float().mean().item()
    assert handle.stats["visual_tokens_kept_per_layer"] == pytest.approx([kept] * len(adapter.layers))
    n_prunable = (visual & ~layout).sum(1)
    assert torch.equal((visual & ~layout & keep).sum(1), torch.round(n_prunable * (1 - ratio)).long())


def test_train_command_writes_checkpoint_and_presets(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llava")
    out = tmp_path / "heads"
    res = CliRunner().invoke(app, ["train", "explain", "--model", str(path), "--samples", "3", "--batch-size", "3",
                                   "--steps", "3", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "explain.safetensors").is_file()
    model, processor = load_tiny(path)
    inputs = make_batch(processor, [next(synthetic_examples(5))]).prompt
    with mmeff.wrap(model, str(out / "explain-75.toml")) as handle:
        assert handle.configs[0].ratio == 0.75
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    n_vis = handle.stats["visual_tokens_in"]
    assert handle.stats["visual_tokens_kept"] == round(n_vis * 0.25)
    res = CliRunner().invoke(app, ["train", "dyvte", "--model", str(path), "--steps", "2", "--batch-size", "2",
                                   "--width", "8", "--output", str(out)])
    assert res.exit_code == 0, res.output
    with mmeff.wrap(model, str(out / "dyvte.toml")):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
