"""Static decode (``cuda_graphs``): single-token steps over preallocated KV buffers, one graph replay per token.

On CPU the static step runs eagerly (``capture=False``): it must reproduce the hooked eager ``generate`` token
for token — every family, with and without token selection, left-padded and multi-image, across buffer growth.
On the GPU the captured graph must reproduce the static step it captured (and so the eager path)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import mmeff
from mmeff.engine.cache import SlotLayer, find_cache
from mmeff.errors import MmeffError
from mmeff_lab.models.factory import load_tiny
from tests.helpers import assert_same_generation, batch

GEN = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True)


def generate(model, inputs, preset: str, static: bool | None, reserve: int = 2) -> tuple[object, dict]:
    """``generate`` through mmeff: eager hooked decode (static None), or the static step eagerly (False) or
    captured in a CUDA graph (True). ``reserve=2`` makes the buffers grow twice in 7 tokens."""
    with mmeff.wrap(model, preset) as handle:
        if static is not None:
            handle.pipeline.enable_static_decode(capture=static, reserve=reserve)
        out = model.generate(**inputs, **GEN)
        runs = handle.pipeline.state.static_run if handle.pipeline.state else None
        info = {"run": runs, "stats": handle.stats}
    return out, info


@torch.no_grad()
@pytest.mark.parametrize("preset", ["none", "fastv", "vflowopt-90"])
def test_static_step_equals_eager_decode(family_model, preset):
    family, model, processor = family_model
    inputs = batch(processor, family)
    want, _ = generate(model, inputs, preset, static=None)
    got, info = generate(model, inputs, preset, static=False)
    assert_same_generation(got, want)
    run = info["run"]
    assert run is not None and run.extra == 8  # 2 -> 4 -> 8 decode columns: it grew and kept running
    layers = find_cache(got).layers
    assert all(isinstance(layer, SlotLayer) and layer.filled is not None for layer in layers)
    # the buffers hold the prompt slots of each layer's group, then the decoded tokens (the last one's K/V are
    # never written: generate stops before feeding it back)
    slots = [run.slots[key] for key in run.group_of]
    assert [layer.stored_length() for layer in layers] == [n + GEN["max_new_tokens"] - 1 for n in slots]
    if preset != "none":  # the selection's layers hold fewer slots than the layers before it
        assert len(run.slots) > 1 and min(slots) < max(slots)
    assert info["stats"]["decode_tokens"] == GEN["max_new_tokens"] - 1


@torch.no_grad()
def test_static_step_with_eager_attention_masks(tiny_model_dir):
    """Eager attention takes additive float masks; the static step builds those instead of booleans."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="eager")
    inputs = batch(processor, "llava")
    for preset in ("none", "fastv"):
        want, _ = generate(model, inputs, preset, static=None)
        got, info = generate(model, inputs, preset, static=False)
        assert info["run"].base == "eager"
        assert_same_generation(got, want)


@torch.no_grad()
def test_refusals_and_unwrap(tiny_model_dir):
    model, _ = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    lm = mmeff.wrap(model, "none").pipeline.adapter.language_model
    mmeff.unwrap(model)
    with pytest.raises(MmeffError, match="one CUDA device"):
        mmeff.wrap(model, "fastv", cuda_graphs=True)  # CPU model
    assert mmeff.handle_of(model) is None
    for preset, name in (("pai", "pai"), ("zipvl", "zipvl"), ("vcd", "vcd")):
        with mmeff.wrap(model, preset) as handle:
            with pytest.raises(MmeffError, match=name):
                handle.pipeline.enable_static_decode(capture=False)
            assert handle.pipeline.static is None and "forward" not in vars(lm)
    with mmeff.wrap(model, "fastv") as handle:
        handle.pipeline.enable_static_decode(capture=False)
        assert "forward" in vars(lm)
    assert "forward" not in vars(lm)  # unwrap restores the decoder's own forward


@torch.no_grad()
def test_manual_decode_loop_and_a_late_ineligible_call(tiny_model_dir):
    """A hand-written decode loop (model(...) per token, 2-D mask grown by hand) takes the static path and
    equals the eager loop; a call the static step cannot serve after it began is refused, not misplaced."""
    from mmeff.engine.cache import cache_kwarg

    model, processor = load_tiny(tiny_model_dir("llava_next"), attn_implementation="sdpa")
    inputs = batch(processor, "llava_next")
    name = cache_kwarg(model.forward)
    logits = {}
    for static in (False, True):
        with mmeff.wrap(model, "fastv") as handle:
            if static:
                handle.pipeline.enable_static_decode(capture=False, reserve=2)
            out = model(**inputs, use_cache=True)
            cache, mask = find_cache(out), inputs["attention_mask"]
            token, steps = out.logits[:, -1:].argmax(-1), []
            for _ in range(4):
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                out = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: cache})
                token = out.logits[:, -1:].argmax(-1)
                steps.append(out.logits[:, -1])
            logits[static] = torch.stack(steps)
            if static:
                assert cache.layers[0].filled is not None
                two = torch.cat([token, token], 1)
                mask = torch.cat([mask, torch.ones_like(two)], 1)
                with pytest.raises(MmeffError, match="feeds 2 tokens"):
                    model(input_ids=two, attention_mask=mask, use_cache=True, **{name: cache})
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_buffers_are_freed_with_the_generation(tiny_model_dir):
    """No reference cycle keeps a finished generation's static run (its buffers, its graph's memory pool)
    alive until the garbage collector happens to run: it goes with the state, on unwrap or the next prefill."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    inputs = batch(processor, "llava")
    gc.collect()
    gc.disable()
    try:
        with mmeff.wrap(model, "fastv") as handle:
            handle.pipeline.enable_static_decode(capture=False)
            model.generate(**inputs, **GEN)
            first = weakref.ref(handle.pipeline.state.static_run)
            model.generate(**inputs, **GEN)
            assert first() is None
            second = weakref.ref(handle.pipeline.state.static_run)
        assert second() is None
    finally:
        gc.enable()


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("preset", ["none", "fastv", "vflowopt-90"])
def test_cuda_graph_replay_equals_static_step(tiny_model_dir, family, preset):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="sdpa")
    model = model.cuda()
    inputs = {k: v.cuda() for k, v in batch(processor, family).items()}
    want, _ = generate(model, inputs, preset, static=None)
    static, _ = generate(model, inputs, preset, static=False)
    got, info = generate(model, inputs, preset, static=True)  # captured three times (2 -> 4 -> 8 columns)
    assert info["run"].graph is not None
    assert_same_generation(got, static, atol=1e-5)
    assert_same_generation(got, want, atol=1e-3)
    with mmeff.wrap(model, preset, cuda_graphs=True):
        assert_same_generation(model.generate(**inputs, **GEN), want, atol=1e-3)
