"""FastV against a slow reference that recomputes the whole forward from scratch at every step (no cache),
with the dropped visual tokens masked out (as keys) of every layer from K on."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.engine.ranking import keep_top
from mmeff.families import adapter_for
from tests.helpers import batch, onevision_nested_batch
from tests.helpers import hidden_tokens_generate as reference_generate


def reference_scores(model, inputs, k: int, query: str) -> torch.Tensor:
    """FastV's statistic from the eager attention weights of layer k-1: mean over heads, then over real rows."""
    out = model(**inputs, output_attentions=True, use_cache=False)
    att = out.attentions[k - 1].float().mean(1)  # [B, N, N]
    real = inputs["attention_mask"].bool()
    if query == "last":
        real = torch.zeros_like(real)
        real[:, -1] = True
    w = real.float()
    return torch.einsum("bqk,bq->bk", att, w) / w.sum(1, keepdim=True)


@pytest.mark.parametrize("preset,k,ratio,query", [
    ("fastv", 2, 0.5, "all"),            # the paper's text
    ("fastv-released", 2, 0.5, "last"),  # the released code's ranking, as a preset
    (None, 1, 0.75, "last"),             # any overrides
])
@torch.no_grad()
def test_fastv_generate_equals_slow_reference(models, preset, k, ratio, query):
    family, eager, sdpa, processor = models
    check_fastv(family, eager, sdpa, batch(processor, family), preset, k, ratio, query)


@torch.no_grad()
def test_fastv_onevision_multi_image_sample(tiny_model_dir):
    """LLaVA-OneVision's multi-image samples (nested images: base tiles + one trailing newline each) beside an
    anyres one, left padded: FastV still equals the slow reference."""
    from mmeff_lab.models.factory import load_tiny

    eager, processor = load_tiny(tiny_model_dir("llava_onevision"), attn_implementation="eager")
    sdpa, _ = load_tiny(tiny_model_dir("llava_onevision"))
    inputs = onevision_nested_batch(processor)
    check_fastv("llava_onevision", eager, sdpa, inputs, "fastv", 2, 0.5, "all")


def check_fastv(family, eager, sdpa, inputs, preset, k, ratio, query):
    adapter = adapter_for(eager)
    spans = adapter.spans(inputs["input_ids"], inputs)
    visual = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    layout = torch.zeros_like(visual)
    for b, sample in enumerate(spans):
        for sp in sample:
            visual[b, sp.start : sp.end] = True
            layout[b, sp.start : sp.end] = sp.grid()["layout"]
    scores = reference_scores(eager, inputs, k, query)
    keep = keep_top(scores, visual & ~layout, ratio)
    dropped = ~keep
    n_vis = (visual & ~layout).sum(1)
    assert torch.equal(dropped.sum(1), n_vis - torch.round(n_vis * (1 - ratio)).long())
    steps = 5
    ref_ids, ref_logits = reference_generate(eager, inputs, dropped, k, steps)

    for model in (eager, sdpa):
        overrides = {} if preset else {"k": k, "ratio": ratio, "query": query}
        with mmeff.wrap(model, preset or "fastv", **overrides) as handle:
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                 output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref_ids), family
        for got, want in zip(out.logits, ref_logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        kept_visual = (visual.sum(1) - dropped.sum(1)).float().mean().item()
        per_layer = handle.stats["visual_tokens_kept_per_layer"]
        assert per_layer[:k] == [visual.sum(1).float().mean().item()] * k
        assert per_layer[k:] == pytest.approx([kept_visual] * (len(per_layer) - k))


@torch.no_grad()
def test_fastv_cache_shrinks_and_logits_keep_shape(models):
    family, _, sdpa, processor = models
    inputs = batch(processor, family)
    ref = sdpa(**inputs)
    with mmeff.wrap(sdpa, "fastv", k=1, ratio=0.5) as handle:
        out = sdpa(**inputs)
        assert out.logits.shape == ref.logits.shape
        n = inputs["input_ids"].shape[1]
        layers = out.past_key_values.layers
        assert layers[0].keys.shape[-2] == n and layers[0].get_seq_length() == n
        assert all(layer.get_seq_length() == n for layer in layers)  # virtual length: original coordinates
        stored = layers[1].keys.shape[-2]
        assert stored < n
        assert handle.stats["kv_cache_bytes"] < sum(
            t.numel() * t.element_size() for layer in ref.past_key_values.layers for t in (layer.keys, layer.values)
        )
        # text positions keep their outputs' shape and the last position (the next-token logits) is defined
        assert torch.isfinite(out.logits).all()
