"""Qwen3-VL: the library is transparent with ``none``, FastV equals the slow reference whether tokens are dropped
after the DeepStack layers (k=2 in the tiny model, whose DeepStack adds after decoder layers 0 and 1) or before the
last of them (k=1), and input-stage pruning equals the unwrapped model run on the kept tokens only (DeepStack
features of the kept tokens included, those of the dropped ones gone); a video's timestamped frames are spans;
every preset runs or is refused with the reason."""

from __future__ import annotations

import pytest
import torch

import mmeff
import tests.test_api as api
from mmeff.families import adapter_for
from mmeff_lab.models.factory import load_tiny
from tests.helpers import batch, visual_mask
from tests.methods.test_explain import explicit_channels
from tests.methods.test_fastv import check_fastv

FAMILY = "qwen3_vl"


@pytest.fixture(scope="module")
def q3(tiny_model_dir):
    path = tiny_model_dir(FAMILY)
    eager, processor = load_tiny(path, attn_implementation="eager")
    sdpa, _ = load_tiny(path, attn_implementation="sdpa")
    return eager, sdpa, processor


def test_tiny_model_has_deepstack_and_interleaved_mrope(q3):
    eager, _, processor = q3
    adapter = adapter_for(eager)
    assert adapter.family == FAMILY and adapter.mrope
    assert adapter.deepstack_layers() == 2 < len(adapter.layers)
    inputs = batch(processor, FAMILY)
    spans = adapter.spans(inputs["input_ids"], inputs)
    assert [len(s) for s in spans] == [1, 2]
    assert torch.equal(visual_mask(eager, inputs), inputs["input_ids"] == eager.config.image_token_id)


@torch.no_grad()
def test_none_equals_unwrapped(q3):
    _, sdpa, processor = q3
    api.test_none_is_transparent_and_unwrap_restores((FAMILY, sdpa, processor))
    assert "_deepstack_process" not in vars(sdpa.model.language_model)  # the DeepStack patch is removed too


@pytest.mark.parametrize("preset,k,ratio,query", [
    ("fastv", 2, 0.5, "all"),   # dropped after both DeepStack additions
    (None, 1, 0.75, "last"),    # dropped before the second: its additions must follow the selection
])
@torch.no_grad()
def test_fastv_equals_slow_reference(q3, preset, k, ratio, query):
    eager, sdpa, processor = q3
    check_fastv(FAMILY, eager, sdpa, batch(processor, FAMILY), preset, k, ratio, query)


def _input_stage_keep(eager, inputs, ratio: float) -> torch.Tensor:
    """explain-attn's kept tokens ([B, N]): per sample, the best round(n (1 - ratio)) visual tokens by the
    attention they receive at layer 0 (channel 0 of the explicit channels), every other token."""
    visual = visual_mask(eager, inputs)
    att0 = eager(**inputs, output_attentions=True, use_cache=False).attentions[0]
    n = inputs["input_ids"].shape[1]
    scores = explicit_channels(att0, visual, inputs["attention_mask"], n)[:, 0]
    keep = ~visual
    for b in range(visual.shape[0]):
        cells = sorted((j for j in range(n) if visual[b, j]), key=lambda j: -float(scores[b, j]))
        for j in cells[: round(len(cells) * (1 - ratio))]:
            keep[b, j] = True
    return keep


def _kept_tokens_only(model, keep_row: torch.Tensor, b: int):
    """A pre-hook of the text model that runs sample ``b`` alone on its kept prompt tokens (padding and dropped
    tokens removed; every later token kept): embeddings, position ids (original values), visual mask and
    DeepStack features gathered alike."""

    def hook(module, args, kwargs):
        emb = kwargs["inputs_embeds"]
        n = keep_row.shape[0]
        keep = torch.cat([keep_row, torch.ones(emb.shape[1] - n, dtype=torch.bool)])
        idx = keep.nonzero().flatten()
        vis = kwargs["visual_pos_masks"]
        offset = int(vis[:b].sum())  # the features of sample b follow those of the samples before it
        own = vis[b]
        feats = [f[offset : offset + int(own.sum())][keep[own]] for f in kwargs["deepstack_visual_embeds"]]
        kwargs["inputs_embeds"] = emb[b : b + 1, idx]
        kwargs["attention_mask"] = torch.ones(1, idx.numel(), dtype=torch.long)
        pos = kwargs["position_ids"]
        kwargs["position_ids"] = pos[:, b : b + 1][..., idx]
        kwargs["visual_pos_masks"] = own[idx][None]
        kwargs["deepstack_visual_embeds"] = feats
        return args, kwargs

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def test_input_stage_equals_unwrapped_on_kept_tokens(q3):
    eager, sdpa, processor = q3
    inputs = batch(processor, FAMILY)
    ratio, steps = 0.75, 4
    keep = _input_stage_keep(eager, inputs, ratio)
    with mmeff.wrap(sdpa, "explain-attn-50", ratio=ratio) as handle:
        out = sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    visual = visual_mask(eager, inputs)
    kept = (visual & keep).sum(1).float().mean().item()
    assert handle.stats["visual_tokens_kept_per_layer"] == pytest.approx([kept] * len(adapter_for(sdpa).layers))
    n = inputs["input_ids"].shape[1]
    for b in range(keep.shape[0]):
        ids, tt = inputs["input_ids"], inputs["mm_token_type_ids"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
        handle_b = _kept_tokens_only(eager, keep[b] & inputs["attention_mask"][b].bool(), b)
        try:
            for step in range(steps):
                kw = dict(extra, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, n:])], 1))
                logits = eager(input_ids=ids, mm_token_type_ids=tt, use_cache=False, **kw).logits[0, -1]
                torch.testing.assert_close(out.logits[step][b], logits, rtol=1e-4, atol=1e-4)
                nxt = out.sequences[:, n + step : n + step + 1]
                assert int(logits.argmax()) == int(nxt[b])
                ids, tt = torch.cat([ids, nxt], 1), torch.cat([tt, torch.zeros_like(nxt)], 1)
        finally:
            handle_b.remove()


@torch.no_grad()
def test_fastv_k1_needs_the_deepstack_patch(q3):
    """The DeepStack patch matters: dropping before layer 1 with it removed fails the model (its mask no longer
    fits the layer's tokens), so the FastV k=1 equality above really exercises the gathering."""
    _, sdpa, processor = q3
    inputs = batch(processor, FAMILY)
    text = sdpa.model.language_model
    with mmeff.wrap(sdpa, "fastv", k=1, ratio=0.5):
        patch = vars(text).pop("_deepstack_process")  # the original method again
        try:
            with pytest.raises((IndexError, RuntimeError)):
                sdpa(**inputs)
        finally:
            text._deepstack_process = patch


@torch.no_grad()
def test_fastv_on_a_video_with_timestamps(q3):
    """A video's frames are separate ``<|vision_start|>`` runs after their timestamp text: one span per frame;
    FastV (k=1, before the last DeepStack addition) still equals the slow reference."""
    np = pytest.importorskip("numpy")
    from mmeff_lab.models.factory import random_image

    eager, sdpa, processor = q3
    if getattr(processor, "video_processor", None) is None:
        pytest.skip("no video processor (torchvision missing)")
    frames = np.stack([np.array(random_image(i, (48, 40))) for i in range(4)])  # 4 frames -> 2 temporal patches
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>describe<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False,
                       video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}])
    (spans,) = adapter_for(sdpa).spans(inputs["input_ids"], inputs)
    assert [(sp.length, len(sp.tiles)) for sp in spans] == [(12, 1), (12, 1)]
    assert "seconds>" in processor.tokenizer.decode(inputs["input_ids"][0, spans[0].end : spans[1].start])
    check_fastv(FAMILY, eager, sdpa, inputs, None, 1, 0.5, "last")


# refused with a ConfigError naming what is missing (as on every family without it): a trained checkpoint, the
# text model's sink dimensions (VAR: none discovered for Qwen3-VL yet), the paper's layers (VHR: LLaVA-1.5 only)
REFUSED = {"dyvte": "checkpoint", "explain-50": "checkpoint", "explain-75": "checkpoint", "explain-90": "checkpoint",
           "var": "no sink dimensions known", "vhr": "no layers for this model"}


@pytest.mark.parametrize("preset", mmeff.available_presets())
@torch.no_grad()
def test_every_preset_runs_or_is_refused_with_the_reason(q3, preset):
    _, sdpa, processor = q3
    inputs = batch(processor, FAMILY)
    if preset.startswith("vflowopt-vit"):  # ours, Qwen2-VL's tower only: refused with the supported family
        with pytest.raises(mmeff.UnsupportedModelError, match="supports only qwen2_vl"):
            mmeff.wrap(sdpa, preset)
        return
    if preset in REFUSED:
        with pytest.raises(mmeff.ConfigError, match=REFUSED[preset]), mmeff.wrap(sdpa, preset):
            sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        return
    with mmeff.wrap(sdpa, preset) as handle:
        out = sdpa.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert 0 < handle.stats["visual_tokens_kept"] <= handle.stats["visual_tokens_in"]
