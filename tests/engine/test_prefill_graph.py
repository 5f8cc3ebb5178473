"""Prefill graphs (``cuda_graphs``): a repeated prefill shape replays one CUDA graph of the whole wrapped forward.

On CPU the "replay" is the eager forward over the captured tensors, its results copied into the captured ones
(``capture=False``): it must give what the eager wrapper gives — for new inputs of the same shape too, every
family, with and without token selection, left-padded multi-image batches, ``generate`` and plain forwards —
and the state a replay hands on must have the structure the capture recorded. On the GPU the real graph must
give what the eager wrapper gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmeff
from mmeff.engine.prefill_graph import Mismatch, copy_into, fork
from mmeff.engine.state import Group
from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import FAMILIES, load_tiny, random_image
from tests.helpers import SIZES, assert_same_generation, batch

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
PRESETS = ["none", "fastv", "fastv-90", "vflowopt-90"]


def other_batch(processor, family: str):
    """Same shapes and spans as :func:`tests.helpers.batch`, other pixels and another last text token."""
    out = make_inputs(
        processor,
        ["describe the picture", "what color is the large shape on the left of these two images"],
        [[random_image(11, SIZES[0])], [random_image(12, SIZES[1]), random_image(13, SIZES[2])]],
    )
    out["input_ids"] = out["input_ids"].clone()
    out["input_ids"][:, -1] = out["input_ids"][:, -2]  # text tokens (the prompts end in text)
    return out


def same_shapes(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def eager(model, preset, inputs):
    with mmeff.wrap(model, preset):
        return model.generate(**inputs, **GEN), model(**inputs).logits


@torch.no_grad()
@pytest.mark.parametrize("preset", PRESETS)
def test_replays_equal_the_eager_wrapper(family_model, preset):
    family, model, processor = family_model
    first, second = batch(processor, family), other_batch(processor, family)
    assert same_shapes(first, second)
    want = [eager(model, preset, x) for x in (first, second)]
    with mmeff.wrap(model, preset) as handle:
        handle.pipeline.enable_static_decode(capture=False)
        handle.pipeline.enable_prefill_graphs(capture=False)
        modes = []
        for i in range(4):  # generate: eager, captured, then replays on new inputs of the same shape
            x = i % 2
            assert_same_generation(model.generate(**(first, second)[x], **GEN), want[x][0])
            modes.append(handle.stats["prefill_graph"])
        for i in range(3):  # plain forwards (another signature: no cache, all logits)
            x = (i + 1) % 2
            torch.testing.assert_close(model(**(first, second)[x]).logits, want[x][1], rtol=1e-4, atol=1e-4)
            modes.append(handle.stats["prefill_graph"])
    level = "" if handle.pipeline.adapter.graph_whole_forward else "decoder "  # Qwen: the decoder alone is graphed
    assert modes[0].startswith(f"{level}eager: first call") and modes[4].startswith(f"{level}eager: first call")
    assert modes[1] == modes[5] == f"{level}captured"
    assert modes[2] == modes[3] == modes[6] == f"{level}replayed"


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    """(tiny SDPA LLaVA, its left-padded multi-image batch) for the single-family tests."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    return model, batch(processor, "llava")


@torch.no_grad()
def test_replay_hands_out_its_own_cache_and_outputs(llava):
    model, inputs = llava
    with mmeff.wrap(model, "fastv") as handle:
        handle.pipeline.enable_prefill_graphs(capture=False)
        graphs = handle.pipeline.prefill_graphs
        outs = [model(**inputs) for _ in range(3)]
        assert handle.stats["prefill_graph"] == "replayed"
        (entry,) = graphs.entries.values()
        replayed = outs[2]
        for layer, captured in zip(replayed.past_key_values.layers, entry.cache.layers):
            assert layer is not captured and layer.keys.data_ptr() != captured.keys.data_ptr()
            torch.testing.assert_close(layer.keys, captured.keys)
            assert layer.removed == captured.removed
        assert replayed.logits.data_ptr() != entry.output.logits.data_ptr()
        state = handle.pipeline.state
        assert state is not entry.post and state.groups[-1].index.data_ptr() != entry.post.groups[-1].index.data_ptr()


@torch.no_grad()
def test_least_recently_used_signatures_are_dropped(llava):
    model, inputs = llava
    with mmeff.wrap(model, "none") as handle:
        handle.pipeline.enable_prefill_graphs(capture=False)
        graphs = handle.pipeline.prefill_graphs
        graphs.max_graphs = 2
        for keep in (1, 2, 3):  # three signatures (logits_to_keep is part of it)
            model(**inputs, logits_to_keep=keep)
        assert len(graphs.entries) == 2
        model(**inputs, logits_to_keep=1)
        assert handle.stats["prefill_graph"].startswith("eager: first call")  # it was dropped: warm-up again


@torch.no_grad()
def test_unsupported_arguments_stay_eager_with_the_reason(llava):
    model, inputs = llava
    with mmeff.wrap(model, "none") as handle:
        handle.pipeline.enable_prefill_graphs(capture=False)
        for _ in range(3):
            model(**inputs, output_hidden_states=True)
            mode = handle.stats["prefill_graph"]
            assert mode.startswith("decoder ") and mode.endswith("whole forward eager: it asks for attentions or "
                                                                 "hidden states")


def test_cuda_graphs_refuse_methods_with_extra_forwards(llava):
    model, _ = llava
    with mmeff.wrap(model, "vcd") as handle, pytest.raises(mmeff.MmeffError, match="not graphable"):
        handle.pipeline.enable_prefill_graphs(capture=False)


def test_fork_keeps_aliasing_and_copy_into_names_the_difference():
    t = torch.arange(6).view(2, 3)
    g = Group(0, t, torch.ones(2, 3, dtype=torch.bool), order=t)
    f = fork({"a": [g, t]}, torch.clone)
    assert f["a"][0] is not g and f["a"][0].index is f["a"][0].order is f["a"][1]
    assert f["a"][0].index is not t and torch.equal(f["a"][0].index, t)
    other = dataclasses.replace(g, index=t + 1, order=t + 1)
    copy_into(f["a"][0], other)
    assert torch.equal(f["a"][1], t + 1)  # one tensor, written once through either name
    with pytest.raises(Mismatch, match=r"\.start_layer: 1 where 0 was captured"):
        copy_into(g, dataclasses.replace(g, start_layer=1))
    with pytest.raises(Mismatch, match=r"\.index: tensor\(2, 2\) where tensor\(2, 3\) was captured"):
        copy_into(g, dataclasses.replace(g, index=t[:, :2]))


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_graph_prefill_equals_eager(tiny_model_dir, family, preset):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="sdpa")
    model = model.cuda()
    first = {k: v.cuda() for k, v in batch(processor, family).items()}
    second = {k: v.cuda() for k, v in other_batch(processor, family).items()}
    want = [eager(model, preset, x) for x in (first, second)]
    with mmeff.wrap(model, preset, cuda_graphs="all") as handle:
        modes = []
        for i in range(4):
            x = i % 2
            assert_same_generation(model.generate(**(first, second)[x], **GEN), want[x][0], atol=1e-3)
            modes.append(handle.stats["prefill_graph"])
        for i in range(3):
            x = (i + 1) % 2
            torch.testing.assert_close(model(**(first, second)[x]).logits, want[x][1], rtol=1e-3, atol=1e-3)
            modes.append(handle.stats["prefill_graph"])
    print(family, preset, modes)
    level = "" if handle.pipeline.adapter.graph_whole_forward else "decoder "
    assert modes[3] == f"{level}replayed" and modes[6] == f"{level}replayed", modes


@torch.no_grad()
def test_a_refused_whole_forward_capture_falls_back_to_decoder_graphs(llava, monkeypatch):
    """CUDA refuses a capture that reads the device (a host sync): that signature's whole forward stays eager,
    with the reason, and the decoder alone is captured and replayed beneath it."""
    model, inputs = llava
    _, want = eager(model, "vflowopt-90", inputs)
    with mmeff.wrap(model, "vflowopt-90") as handle:
        handle.pipeline.enable_prefill_graphs(capture=False)
        whole = handle.pipeline.prefill_graphs
        real = type(whole)._capture

        def refuse(self, entry, original, bound, st):
            if self is whole:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            return real(self, entry, original, bound, st)

        monkeypatch.setattr(type(whole), "_capture", refuse)
        modes = []
        for _ in range(4):
            torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-4)
            modes.append(handle.stats["prefill_graph"])
    refused = "whole forward eager: the capture failed (RuntimeError: operation not permitted when stream is capturing"
    assert modes[0].startswith("eager: first call")
    assert modes[1].startswith("decoder captured;") and refused in modes[1]  # its warm-up was the first call
    assert modes[2].startswith("decoder replayed;") and modes[3].startswith("decoder replayed;") and refused in modes[3]


def test_cuda_graphs_values(llava):
    model, _ = llava
    with pytest.raises(mmeff.MmeffError, match=r"cuda_graphs must be False, True / 'decode' or 'all', got 'yes'"):
        mmeff.wrap(model, "none", cuda_graphs="yes")
    with pytest.raises(mmeff.MmeffError, match="one CUDA device"):  # on a CPU model, before anything is attached
        mmeff.wrap(model, "none", cuda_graphs="all")
    assert mmeff.handle_of(model) is None
