"""Explainability-guided pruning: the relevance rule against hand-derived values, both relevance targets and
the greedy-answer batches against a slow reference (one forward and backward per answer token, the full
relevance matrix), the probe against attention rows read from eager maps, the mapper on grids larger than
trained on, input-stage pruning against a slow reference that rebuilds the channels, maps and kept tokens from
explicit attention rows, and the training command end to end."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mmeff
from mmeff.errors import MmeffError
from mmeff.families import adapter_for
from mmeff.heads import load_head, save_head
from mmeff.methods._teacher import greedy_batch, make_batch
from mmeff.methods.explain.method import Explain, RelevanceMapper, normalise
from mmeff.methods.explain.train import (
    chefer_rule,
    collect_pairs,
    head_tensors,
    relevance_and_channels,
)
from mmeff_lab.cli import app
from mmeff_lab.models.factory import FAMILIES, load_tiny
from mmeff_lab.training.data import synthetic_examples
from tests.helpers import batch, greedy_recompute, visual_mask
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


def slow_relevance(model, b, per_token: bool) -> torch.Tensor:
    """[B, N] relevance written out from the rule (eager model, parameters require grad): per answer token of
    each sample its own forward and backward and the full matrix R = I; R <- R + mean_h((dy/dA * A)^+) R, row i
    of R kept; or, summed, one backward of all answer logits and every answer row of each sample's R."""
    rows, targets = b.rows.cpu(), b.targets.cpu()
    n_b, n = rows.shape
    rel = torch.zeros(n_b, n, dtype=torch.float64)
    outputs = [[(s, i)] for s in range(n_b) for i in range(n) if rows[s, i]] if per_token else [
        [(s, i) for s in range(n_b) for i in range(n) if rows[s, i]]]
    for group in outputs:
        out = model(**b.inputs, use_cache=False, output_attentions=True)
        y = sum(out.logits[s, i, targets[s, i]] for s, i in group)
        grads = torch.autograd.grad(y, list(out.attentions))
        for s in sorted({s for s, _ in group}):
            r = torch.eye(n, dtype=torch.float64)
            for a, g in zip(out.attentions, grads):
                cam = (a[s].double().detach() * g[s].double()).clamp(min=0).mean(0)
                r = r + cam @ r
            for s2, i in group:
                if s2 == s:
                    rel[s] += r[i]
    return rel.float()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("answer", ["teacher", "greedy"])
def test_relevance_targets_equal_slow_reference(tiny_model_dir, family, answer):
    path = tiny_model_dir(family)
    sdpa, processor = load_tiny(path)  # the trainer switches the decoder to eager itself
    eager, _ = load_tiny(path, attn_implementation="eager")
    exs = [next(synthetic_examples(s)) for s in (1, 2)]
    if answer == "greedy":
        b = greedy_batch(sdpa, processor, exs, max_new_tokens=3)
        # the answers are the model's greedy tokens (full recompute, no cache), up to the first EOS
        ids, _ = greedy_recompute(eager, make_batch(processor, exs).prompt, 3)
        eos = processor.tokenizer.eos_token_id
        for s in range(2):
            want = ids[s, b.prompt_len:].tolist()
            want = want[: want.index(eos) + 1] if eos in want else want
            assert b.targets[s][b.rows[s]].tolist() == want
    else:
        b = make_batch(processor, exs)
    assert int(b.rows.sum(1).min()) >= 2  # several answer tokens: the two targets differ
    per_token, _, visual = relevance_and_channels(sdpa, b, "per-token")
    summed, _, _ = relevance_and_channels(sdpa, b, "summed")
    want_pt = slow_relevance(eager, b, per_token=True)
    want_sum = slow_relevance(eager, b, per_token=False)
    torch.testing.assert_close(per_token, want_pt, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(summed, want_sum, rtol=1e-4, atol=1e-6)
    # the clamp after summing the gradients is not the sum of per-token relevances
    gap = (want_pt[visual] - want_sum[visual]).abs().max()
    assert gap > 1e-3 * want_pt[visual].abs().max(), float(gap)


def test_bad_target_and_answer_are_refused(tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir("llava"))
    b = make_batch(processor, [next(synthetic_examples(1))])
    with pytest.raises(MmeffError, match="target must be one of per-token, summed, got 'chefer'"):
        relevance_and_channels(model, b, "chefer")
    with pytest.raises(MmeffError, match="answer must be one of teacher, greedy, got 'own'"):
        collect_pairs(model, processor, synthetic_examples(1), 1, 1, answer="own")


def explicit_channels(att0: torch.Tensor, visual: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int
                      ) -> torch.Tensor:
    """[B, 2, N] read off eager layer-0 attention [B, H, N, N], row by row: the head-mean attention row of the
    last prompt token, and the mean of the head-mean rows of the real prompt tokens after the last image."""
    n_b, _, n, _ = att0.shape
    out = torch.zeros(n_b, 2, n)
    for s in range(n_b):
        rows = att0[s].float().mean(0)
        last_vis = max(j for j in range(n) if visual[s, j])
        instr = [i for i in range(last_vis + 1, n_prompt) if attention_mask[s, i]]
        out[s, 0] = rows[n_prompt - 1]
        out[s, 1] = sum(rows[i] for i in instr) / len(instr)
    return out


def explicit_scores(mapper: RelevanceMapper, channels: torch.Tensor, spans) -> torch.Tensor:
    """[B, N] mapper output per visual cell: each tile's cells placed at (row, col) by ``offset_of``, each map
    divided by its mean, then the mapper's conv stack (``net``, not its forward)."""
    out = torch.zeros(channels.shape[0], channels.shape[2])
    for s, sample in enumerate(spans):
        for sp in sample:
            for t, tl in enumerate(sp.tiles):
                cells = [(r, c, sp.start + sp.offset_of(t, r, c)) for r in range(tl.rows) for c in range(tl.cols)]
                maps = torch.zeros(2, tl.rows, tl.cols)
                for r, c, pos in cells:
                    maps[:, r, c] = channels[s, :, pos]
                maps = maps / maps.mean((1, 2), keepdim=True)
                with torch.no_grad():
                    pred = mapper.net(maps[None])[0, 0]
                for r, c, pos in cells:
                    out[s, pos] = pred[r, c]
    return out


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
    eager, _ = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    with torch.no_grad():
        att0 = eager(**b.prompt, output_attentions=True, use_cache=False).attentions[0]
    want = explicit_channels(att0, visual[:, :n], b.prompt["attention_mask"], n)
    torch.testing.assert_close(seen["c"], want, rtol=1e-4, atol=1e-6)
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


@pytest.mark.parametrize("scorer", ["mapper", "attention"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruning_at_input_equals_slow_reference(tiny_model_dir, tmp_path, family, scorer):
    """``explain-*`` (the mapper on the explicit channels) and ``explain-attn-*`` (ours: channel 0 itself)."""
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
    att0 = eager(**inputs, output_attentions=True, use_cache=False).attentions[0]
    n = inputs["input_ids"].shape[1]
    channels = explicit_channels(att0, visual, inputs["attention_mask"], n)
    scores = explicit_scores(mapper, channels, spans) if scorer == "mapper" else channels[:, 0]
    keep = ~(visual & ~layout)  # per sample, the round(n (1 - ratio)) best-scored prunable cells
    for b in range(visual.shape[0]):
        cells = sorted((j for j in range(n) if visual[b, j] and not layout[b, j]), key=lambda j: -float(scores[b, j]))
        for j in cells[: round(len(cells) * (1 - ratio))]:
            keep[b, j] = True
    steps = 4
    ref_ids, ref_logits = reference_generate(eager, inputs, ~keep, 0, steps)
    ckpt = save_mapper(tmp_path / "m.safetensors", sdpa, mapper)
    preset = ("explain-50", {"checkpoint": str(ckpt)}) if scorer == "mapper" else ("explain-attn-50", {})
    with mmeff.wrap(sdpa, preset[0], ratio=ratio, **preset[1]) as handle:
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
    _, meta = load_head(out / "explain.safetensors", "explain")
    assert meta["settings"]["target"] == "per-token" and meta["settings"]["answer"] == "teacher"
    assert meta["report"]["target"] == "per-token"
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
    _, meta = load_head(out / "dyvte.safetensors", "dyvte")
    assert meta["settings"]["warmup"] == 0.0 and meta["settings"]["exit_layers"] == "all"
    with mmeff.wrap(model, str(out / "dyvte.toml")):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize(("args", "message"), [
    (["explain", "--target", "chefer"], "--target must be one of per-token, summed, got 'chefer'"),
    (["explain", "--answer", "own"], "--answer must be one of teacher, greedy, got 'own'"),
    (["dyvte", "--exit-layers", "both"], "--exit-layers must be one of all, one, got 'both'"),
    (["dyvte", "--warmup", "1.5"], "warmup is a share of the steps in [0, 1), got 1.5"),
])
def test_train_command_refuses_bad_options_before_loading(tmp_path, args, message):
    res = CliRunner().invoke(app, ["train", *args, "--model", str(tmp_path / "no-model"), "--output", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert message in res.output.splitlines()[-1] and "Traceback" not in res.output
