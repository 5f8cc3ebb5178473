"""Tests for the tiny-model factory: real classes, save/load round trip, batching, determinism."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import FAMILIES, build_tiny, load_tiny, random_image

# Image sizes (width, height): non-square and distinct so anyres tiles / dynamic Qwen grids differ per image.
SIZES = [(48, 40), (40, 64), (64, 32)]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], tuple]:
    cache: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in cache:
            cache[family] = load_tiny(tiny_model_dir(family))
        return cache[family]

    return get


def _best_pinpoint(w: int, h: int) -> tuple[int, int]:
    """LLaVA-NeXT anyres choice: most effective resolution kept, then least wasted area; returns (h, w)."""
    def score(pin: tuple[int, int]) -> tuple[int, int]:
        scale = min(pin[1] / w, pin[0] / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        return effective, -(pin[0] * pin[1] - effective)

    return max([(32, 32), (32, 64), (64, 32), (64, 64)], key=score)


def _expected_image_tokens(family: str, size: tuple[int, int]) -> int:
    """Image-token count computed from the tiny configs, independently of the processors."""
    w, h = size
    if family == "llava":
        return (32 // 8) ** 2  # 32 px crop, patch 8, CLS dropped
    if family in ("llava_next", "llava_onevision"):
        # base tile (16) + anyres grid unpadded to the image's aspect ratio + one newline per row
        best_h, best_w = _best_pinpoint(w, h)
        rows, cols = best_h // 8, best_w // 8
        if w / h > cols / rows:
            rows -= 2 * ((rows - int(round(h * cols / w, 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(w * rows / h, 7))) // 2)
        if family == "llava_onevision":  # anyres_max_2: a grid above 1.1^2 * 2 tiles of 16 is scaled down
            ratio = (rows * cols / (2 * 16)) ** 0.5
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return 16 + rows * cols + rows
    # Qwen: sides rounded to multiples of 8 px (patch 4 x merge 2); one token per 8x8 px.
    return round(w / 8) * round(h / 8)


def test_unknown_family_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llava, llava_next, qwen2_vl, qwen2_5_vl"):
        build_tiny("blip2", tmp_path)


def test_build_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="missing or empty"):
        build_tiny("llava", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_tiny_and_consistent(family: str, loaded) -> None:
    model, processor = loaded(family)
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        4, 64, 4, 2)
    assert text.vocab_size == len(processor.tokenizer)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids(processor.image_token)
    gen = model.generation_config
    assert gen.do_sample is False and gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    if family.startswith("qwen"):
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    if family == "qwen2_5_vl":
        vis = model.config.vision_config
        assert all(0 <= i < vis.depth for i in vis.fullatt_block_indexes)
        assert vis.window_size % (vis.patch_size * vis.spatial_merge_size) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_forward_and_generate(family: str, loaded) -> None:
    model, processor = loaded(family)
    images = [[random_image(1, SIZES[0])], [random_image(2, SIZES[1]), random_image(3, SIZES[2])]]
    texts = ["Is there a dog?", "Describe both images in detail, please, and name every object you see."]
    batch = make_inputs(processor, texts, images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0] and mask[1].all()  # left padding, longer sample unpadded
    n_img = (ids == model.config.image_token_id).sum(1).tolist()
    exp = [[_expected_image_tokens(family, SIZES[0])], [_expected_image_tokens(family, s) for s in SIZES[1:]]]
    assert n_img == [sum(e) for e in exp]
    if family.startswith("qwen"):
        assert len({e for row in exp for e in row}) == 3  # dynamic resolution: each size its own grid

    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, ids.shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()

    # The padded sample's last-token logits must match the same sample run alone (no padding).
    single = make_inputs(processor, texts[:1], images[:1])
    with torch.no_grad():
        alone = model(**single).logits
    torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=1e-4, rtol=1e-4)

    out = model.generate(**batch, max_new_tokens=3)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 3
    assert torch.equal(out, model.generate(**batch, max_new_tokens=3))  # greedy by default


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_text_only_and_right_padding(family: str, loaded) -> None:
    model, processor = loaded(family)
    batch = make_inputs(processor, ["A long text only prompt about a cat and a dog.", "What?"],
                        [[], [random_image(5, SIZES[0])]], padding_side="right")
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"].all()
    assert processor.tokenizer.padding_side == "left"  # restored after the call
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    text_only = make_inputs(processor, ["Hello there.", "Is there a cat in the image?"], [[], []])
    assert "pixel_values" not in text_only
    with torch.no_grad():
        assert torch.isfinite(model(**text_only).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family: str, tiny_model_dir, loaded) -> None:
    model, processor = loaded(family)
    eager, _ = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    batch = make_inputs(processor, ["Is there a car?", "Describe it."],
                        [[random_image(7, SIZES[2])], [random_image(8, SIZES[1])]])
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: their logits are arbitrary
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits[real], model(**batch).logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_weights_and_seed_determinism(family: str, tmp_path: Path, tiny_model_dir, loaded) -> None:
    path = tiny_model_dir(family)
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert json.loads((path / "config.json").read_text())["model_type"] == family

    # The real loading path found every weight in the file: nothing missing (silently re-initialised).
    model_cls = type(loaded(family)[0])
    _, info = model_cls.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    saved = load_file(path / "model.safetensors")
    again = load_file(build_tiny(family, tmp_path / "same", seed=0) / "model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    other = load_file(build_tiny(family, tmp_path / "other", seed=1) / "model.safetensors")
    assert any(not torch.equal(saved[k], other[k]) for k in saved)
    # Loading the same-seed copy gives the same in-memory state dict.
    reloaded = load_tiny(tmp_path / "same")[0].state_dict()
    state = loaded(family)[0].state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)


def test_random_image_is_deterministic() -> None:
    a, b, c = random_image(3, (40, 24)), random_image(3, (40, 24)), random_image(4, (40, 24))
    assert a.size == (40, 24) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_make_inputs_rejects_mismatched_lengths(loaded) -> None:
    _, processor = loaded("llava")
    with pytest.raises(ValueError, match="2 texts but 1 image lists"):
        make_inputs(processor, ["a", "b"], [[]])
    with pytest.raises(ValueError, match="padding_side"):
        make_inputs(processor, ["a"], [[]], padding_side="middle")
