"""Visual spans found from input ids: multi-image, left-padded batches; grid layouts that round-trip and
agree with where the model itself puts image features and layout (newline) embeddings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmeff.families import FAMILY_NAMES, adapter_for
from mmeff.families.base import ImageSpan, Tile, runs
from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import FAMILIES, load_tiny, random_image
from tests.helpers import SIZES, batch, onevision_nested_batch


def test_runs():
    m = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert runs(m) == [(1, 2), (4, 1), (7, 1)]
    assert runs(torch.zeros(3, dtype=torch.bool)) == []


def test_grid_round_trip():
    span = ImageSpan(10, 4 + 2 * 4, 0, (Tile(0, 2, 2), Tile(4, 2, 3, newline=True)))
    g = span.grid()
    assert g["layout"].tolist() == [False] * 4 + [False, False, False, True] * 2
    for off in range(span.length):
        if not g["layout"][off]:
            assert span.offset_of(int(g["tile"][off]), int(g["row"][off]), int(g["col"][off])) == off
    with pytest.raises(IndexError):
        span.offset_of(1, 0, 3)  # the newline column is not a grid cell


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir(request.param))
    return request.param, model, processor


def _lm_inputs(model, inputs) -> torch.Tensor:
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    adapter = adapter_for(model)
    h = adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return captured["embeds"]


def test_spans_multi_image_left_padded(family_model):
    family, model, processor = family_model
    assert family in FAMILY_NAMES
    adapter = adapter_for(model)
    inputs = batch(processor, family)
    ids = inputs["input_ids"]
    spans = adapter.spans(ids, inputs)
    assert [len(s) for s in spans] == [1, 2]
    assert [sp.image_index for s in spans for sp in s] == [0, 1, 2]
    image_ids = torch.tensor(adapter.image_token_ids)
    covered = torch.zeros_like(ids, dtype=torch.bool)
    for b, sample in enumerate(spans):
        for sp in sample:
            assert torch.isin(ids[b, sp.start : sp.end], image_ids).all()
            covered[b, sp.start : sp.end] = True
            if family.startswith("qwen"):  # bracketed by the vision start/end tokens
                assert int(ids[b, sp.start - 1]) == model.config.vision_start_token_id
                assert int(ids[b, sp.end]) == model.config.vision_end_token_id
    assert torch.equal(covered, torch.isin(ids, image_ids))
    # the same sample alone (no padding) has the same spans, shifted by its padding
    pad = int((inputs["attention_mask"][0] == 0).sum())
    alone = make_inputs(processor, ["describe the picture"], [[random_image(1, SIZES[0])]])
    alone_spans = adapter.spans(alone["input_ids"], alone)
    assert [(s.start + pad, s.length, s.tiles) for s in alone_spans[0]] == [
        (s.start, s.length, s.tiles) for s in spans[0]
    ]


def test_layout_tokens_are_where_the_model_puts_newlines(family_model):
    family, model, processor = family_model
    inputs = batch(processor, family)
    embeds = _lm_inputs(model, inputs)
    spans = adapter_for(model).spans(inputs["input_ids"], inputs)
    newline = getattr(model.model, "image_newline", None)
    for b, sample in enumerate(spans):
        for sp in sample:
            layout = sp.grid()["layout"]
            feats = embeds[b, sp.start : sp.end]
            if newline is None:
                assert not layout.any()
                continue
            is_newline = (feats == newline.to(feats.dtype)).all(-1)
            assert torch.equal(is_newline, layout), family
            assert layout.sum() == sp.tiles[1].rows  # one newline closes each row of the unpadded grid


def test_llava_grid_is_row_major_over_patches(tiny_model_dir):
    """Token (r, c) of a LLaVA tile is the projected feature of vision patch (r, c)."""
    model, processor = load_tiny(tiny_model_dir("llava"))
    inputs = make_inputs(processor, ["look"], [[random_image(5, SIZES[0])]])
    embeds = _lm_inputs(model, inputs)
    (span,) = adapter_for(model).spans(inputs["input_ids"], inputs)[0]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    g = span.grid()
    side = span.tiles[0].rows
    for off in range(span.length):
        r, c = int(g["row"][off]), int(g["col"][off])
        torch.testing.assert_close(embeds[0, span.start + off], feats[r * side + c])


def test_import_prints_presets():
    out = subprocess.run(
        [sys.executable, "-c", "import mmeff; print(mmeff.available_presets())"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "'none'" in out and "'fastv'" in out


def test_onevision_layouts_follow_anyres_max_and_multi_image_samples(tiny_model_dir):
    """LLaVA-OneVision: an unpadded grid above anyres_max's budget is interpolated down (its newlines still close
    every row), a smaller one is kept; the images of a multi-image sample (nested images, ``batch_num_images``)
    are their base tile and one trailing newline. Checked against where the model puts the newline embeddings."""
    model, processor = load_tiny(tiny_model_dir("llava_onevision"))
    adapter = adapter_for(model)
    assert adapter.vision_prefix == 0 and adapter.feature_layer() == len(adapter.vision_layers()) - 1
    # (48, 40): 2x2 tiles unpadded to 6x8 = 48 > 1.1^2 * 2 * 16 patches -> 4x6; (64, 32): 1x2 tiles, 4x8 kept
    for size, grid in (((48, 40), (4, 6)), ((64, 32), (4, 8))):
        one = make_inputs(processor, ["look"], [[random_image(5, size)]])
        (span,) = adapter.spans(one["input_ids"], one)[0]
        assert (span.tiles[1].rows, span.tiles[1].cols) == grid and span.tiles[1].newline
    inputs = onevision_nested_batch(processor)
    spans = adapter.spans(inputs["input_ids"], inputs)
    assert [len(sp.tiles) for s in spans for sp in s] == [2, 1, 1]
    assert [sp.trailing_layout for s in spans for sp in s] == [0, 1, 1]
    embeds = _lm_inputs(model, inputs)
    newline = model.model.image_newline
    for b, sample in enumerate(spans):
        for sp in sample:
            is_newline = (embeds[b, sp.start : sp.end] == newline.to(embeds.dtype)).all(-1)
            assert torch.equal(is_newline, sp.grid()["layout"])


def test_onevision_refuses_video(tiny_model_dir):
    from mmeff.errors import ImageTokenMismatchError

    model, _ = load_tiny(tiny_model_dir("llava_onevision"))
    ids = torch.tensor([[1, 2, model.config.video_token_id, 3]])
    with pytest.raises(ImageTokenMismatchError, match=r"video input .* is not supported"):
        adapter_for(model).spans(ids, {"input_ids": ids})
