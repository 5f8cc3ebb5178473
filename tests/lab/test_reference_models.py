"""The shipped reference VLMs: loading, answering, file sizes, processor-exact GPU preprocessing, attention."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmeff_lab.reference.model import (
    ARCHS,
    NUM_VISUAL_TOKENS,
    answer_text,
    chat_prompt,
    load_reference,
    object_attention_ratio,
    object_token_mask,
    reference_dir,
)
from mmeff_lab.reference.scenes import make_scene, render
from mmeff_lab.reference.synthetic import HELDOUT_SEED_BASE, JPEG_QUALITY
from mmeff_lab.reference.training import batch_inputs, encode_examples, gpu_pixel_inputs, pixel_lut, render_scene
from mmeff_lab.reference.vocab import article

MIB = 1 << 20
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


def _jpeg(seed: int) -> Image.Image:
    buf = io.BytesIO()
    render(make_scene(seed)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded(arch: str):
    return load_reference(arch=arch, attn_implementation="eager")


def test_files_are_safetensors_within_16_mib(arch: str) -> None:
    folder = reference_dir(arch)
    weights = sorted(folder.glob("*.safetensors"))
    assert weights, f"{folder}: no safetensors weights"
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    assert all(f.stat().st_size <= 16 * MIB for f in folder.iterdir())
    assert sum(f.stat().st_size for f in weights) <= 16 * MIB


def test_loads_and_answers_yes_no(arch: str, loaded) -> None:
    model, processor = loaded
    assert type(model).__name__ == {"llava": "LlavaForConditionalGeneration",
                                    "qwen2vl": "Qwen2VLForConditionalGeneration"}[arch]
    seed = HELDOUT_SEED_BASE + 3
    present = make_scene(seed).categories[0]
    prompt = chat_prompt(arch, f"Is there {article(present)} {present} in the image?" + POPE_SUFFIX)
    inputs = processor(text=[prompt], images=[_jpeg(seed)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == NUM_VISUAL_TOKENS
    out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert answer in ("Yes", "No"), answer


def test_chat_prompt_matches_template(arch: str, loaded) -> None:
    _, processor = loaded
    q = "Please describe this image in detail."
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) == chat_prompt(arch, q)


def test_gpu_preprocessing_matches_processor(arch: str, loaded) -> None:
    """The training path (uint8 pixels -> LUT -> layout; expanded token ids) equals the saved processor's output."""
    _, processor = loaded
    seeds = [11, 12, 13]
    rendered = [render_scene(s, draws=1) for s in seeds]
    pixels = torch.from_numpy(np.stack([p for p, _, _ in rendered]))
    mine = gpu_pixel_inputs(pixel_lut(processor), processor, pixels)
    ref = processor.image_processor(images=[Image.fromarray(p) for p, _, _ in rendered], return_tensors="pt")
    assert set(mine) <= set(ref)
    for k, v in mine.items():
        assert torch.equal(v, ref[k]), k
    texts = [qa for _, qa, _ in rendered]
    ex = encode_examples(arch, processor.tokenizer, texts)
    flat = [(i, q, a) for i, draws in enumerate(texts) for qa in draws for q, a in qa]
    idx = torch.tensor([0, 3, len(flat) - 1])
    batch = batch_inputs(ex, idx, arch)
    for j, i in enumerate(idx.tolist()):
        im, q, a = flat[i]
        full = processor(text=[chat_prompt(arch, q) + answer_text(arch, a) + processor.tokenizer.eos_token],
                         images=[Image.fromarray(rendered[im][0])], return_tensors="pt")
        n = int(batch["attention_mask"][j].sum())
        for k in ("input_ids", "mm_token_type_ids"):
            if k in batch:
                assert torch.equal(full[k][0], batch[k][j, :n]), k
        target = batch["input_ids"][j][batch["labels"][j] != -100]
        assert processor.tokenizer.decode(target) == answer_text(arch, a) + processor.tokenizer.eos_token


def test_object_token_mask() -> None:
    scene = make_scene(HELDOUT_SEED_BASE + 1)
    mask = object_token_mask(scene.objects[:1])
    assert mask.shape == (NUM_VISUAL_TOKENS,) and 0 < int(mask.sum()) < NUM_VISUAL_TOKENS


def test_attention_on_asked_object(arch: str, loaded, request: pytest.FixtureRequest) -> None:
    """Existence questions: the last prompt token attends >= 3x more to the asked object's tokens than on average."""
    if arch == "qwen2vl":  # strict: reaching 3x turns this into a failure that asks to remove the mark
        request.applymarker(pytest.mark.xfail(strict=True, reason="issue 4: the Qwen2-VL reference answers from "
                                              "the image but its last-token attention is diffuse (~1.6x)"))
    model, processor = loaded
    ratios = []
    for k in range(6):
        scene = make_scene(HELDOUT_SEED_BASE + 100 + k)
        cat = scene.categories[k % len(scene.categories)]
        r, _ = object_attention_ratio(model, processor, arch, _jpeg(scene.seed), scene.objects_of(cat),
                                      f"Is there {article(cat)} {cat} in the image?" + POPE_SUFFIX)
        ratios.append(r)
    assert float(np.mean(ratios)) >= 3.0, ratios


def test_patch_labels_follow_boxes_and_draw_order() -> None:
    from mmeff_lab.reference.scenes import Scene, SceneObject
    from mmeff_lab.reference.training import patch_labels
    from mmeff_lab.reference.vocab import CATEGORIES, DEFAULT_GLYPHS, GLYPH_STYLES

    a, b = CATEGORIES[0], CATEGORIES[1]
    glyphs = GLYPH_STYLES[DEFAULT_GLYPHS]
    big = SceneObject(a, "red", (255, 0, 0), 0.5, 0.5, 0.3, 1.0, 0.0, (0.0, 0.0, 0.5, 0.5), glyphs[a])
    top = SceneObject(b, "blue", (0, 0, 255), 0.3, 0.3, 0.1, 1.0, 0.0, (0.25, 0.25, 0.5, 0.5), glyphs[b])
    scene = Scene(seed=0, groups=("kitchen",), objects=(big, top))
    lab = patch_labels(scene, grid=4)  # cell centres at 0.125, 0.375, 0.625, 0.875
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[:2, :2] = 1  # the first category covers the top-left quadrant
    expected[1, 1] = 2  # the later (top-most) object wins where both cover the centre
    assert np.array_equal(lab, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_auxiliary_vision_loss_trains_on_cpu(arch: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmeff_lab.reference.training import TrainConfig, prepare_data, train

    data = prepare_data(tmp_path / "data", 4, draws=1, workers=1)
    assert np.load(data / "labels.npy").shape == (4, 16, 16)
    cfg = TrainConfig(arch=arch, data_dir=str(data), out_dir=str(tmp_path / arch), minutes=1.0, total_minutes=0.02,
                      batch_size=2, warmup_steps=1, device="cpu", aux_weight=1.0, log_every=1, probe_scenes=2)
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / arch / "train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["aux_loss"]) and r["aux_loss"] > 0 for r in log)
    out = capsys.readouterr().out
    acc = float(out.split("validation existence accuracy ")[-1].split()[0])
    assert 0.0 <= acc <= 1.0


def test_qwen_training_speedups_equal_stock_forward(tmp_path) -> None:
    """Batched vision attention + precomputed M-RoPE ids give the stock Qwen2-VL loss and logits."""
    from mmeff_lab.reference.model import build_model
    from mmeff_lab.reference.training import _QwenTrainingSpeedups

    texts = [render_scene(HELDOUT_SEED_BASE + i, draws=1)[1] for i in range(3)]
    pixels = torch.from_numpy(np.stack([render_scene(HELDOUT_SEED_BASE + i, draws=1)[0] for i in range(3)]))
    model, processor = build_model("qwen2vl", seed=1)
    model.eval()
    ex = encode_examples("qwen2vl", processor.tokenizer, texts)
    idx = torch.tensor([0, 5, len(ex.length) - 1])  # ragged widths, three different images
    inputs = batch_inputs(ex, idx, "qwen2vl")
    pix = gpu_pixel_inputs(pixel_lut(processor), processor, pixels[ex.image[idx]])
    with torch.no_grad():
        ref = model(**inputs, **pix)
        fast = _QwenTrainingSpeedups(model, ex, processor)
        out = model(**inputs, **pix, position_ids=fast.position_ids_for(inputs["input_ids"]))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-6, rtol=1e-5)


def test_resized_model_starts_from_shipped_weights_except_skipped() -> None:
    """init_from copies every parameter not named by ``skip`` (shapes must fit) and leaves the skipped ones."""
    from mmeff_lab.reference.model import build_model
    from mmeff_lab.reference.training import init_from

    deep, _ = build_model("llava", text_overrides={"num_hidden_layers": 8, "num_key_value_heads": 2,
                                                   "intermediate_size": 352})
    assert deep.config.text_config.num_hidden_layers == 8 and deep.config.text_config.num_key_value_heads == 2
    fresh = {k: v.clone() for k, v in deep.state_dict().items()}
    with pytest.raises(ValueError, match="do not fit the model"):
        init_from(deep, reference_dir("llava"))  # 6-layer MLPs of width 704 do not fit
    init_from(deep, reference_dir("llava"), r"language_model\.layers\.")
    shipped = load_reference(arch="llava")[0].state_dict()
    got = deep.state_dict()
    copied = [k for k in shipped if "language_model.layers." not in k]
    assert len(copied) > 50 and all(torch.equal(got[k], shipped[k]) for k in copied)
    assert all(torch.equal(got[k], fresh[k]) for k in got if "language_model.layers." in k)


def test_qwen_rope_override_reaches_the_decoder() -> None:
    """text_overrides may replace the Qwen decoder's M-RoPE parameters (the theta experiment), and nothing else
    changes: the shipped weights load into it unchanged."""
    from mmeff_lab.reference.model import build_model
    from mmeff_lab.reference.training import init_from

    rope = {"rope_type": "default", "rope_theta": 100.0, "mrope_section": [8, 12, 12]}
    model, _ = build_model("qwen2vl", text_overrides={"rope_parameters": rope})
    assert model.config.text_config.rope_parameters["rope_theta"] == 100.0
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert inv_freq[20].item() == pytest.approx(100.0 ** (-40 / 64))  # first width frequency
    init_from(model, reference_dir("qwen2vl"))
    shipped = load_reference(arch="qwen2vl")[0].state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items() if k in shipped)
