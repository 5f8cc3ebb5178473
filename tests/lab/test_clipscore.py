"""CLIPScore (Hessel et al. 2021) with open_clip: per-caption CLIP-S against a slow reference written out here,
the model spec's errors, and the CLIP-S column of ``mmeff eval`` / ``mmeff score chair``. A tiny random open_clip
model built from a config and saved as a local checkpoint stands in for a real CLIP (no hub download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.evaluation.bootstrap import paired_bootstrap
from mmeff_lab.evaluation.clipscore import ClipScoreError, clip_s, import_open_clip, load_scorer
from mmeff_lab.reference.synthetic import ensure_benchmarks

open_clip = pytest.importorskip("open_clip", reason='open_clip not installed (pip install "mmeff[clip]")')

runner = CliRunner()
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of a tiny random open_clip CLIP, built from the config with open_clip itself."""
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "mmeff-tiny-clip.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(3)
    model = open_clip.CLIP(**TINY)
    checkpoint = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_benchmarks(tmp_path_factory.mktemp("bench"), n_pope_images=2, n_chair_images=3, n_mme_images=1)


def _images(folder: Path) -> list[Path]:
    """A few images of different sizes and modes (the resize and centre crop matter)."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w, mode) in enumerate([(40, 64, "RGB"), (64, 40, "RGB"), (32, 32, "L"), (50, 50, "RGBA"),
                                      (90, 30, "RGB"), (36, 48, "RGB")]):
        pixels = rng.integers(0, 256, (h, w, len(mode) if mode != "L" else 1), dtype=np.uint8).squeeze()
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, mode).save(path)
        out.append(path)
    return out


def _reference_clip_s(model, images: list[Path], captions: list[str]) -> np.ndarray:
    """jmhessel/clipscore, step by step: CLIP's test transform (bicubic resize to 224 -> here the model's 32,
    centre crop, RGB, ToTensor, CLIP mean/std), "A photo depicts " + caption tokenised with truncation to 77 (the
    last kept token replaced by end-of-text), features L2-normalised, w * max(cos, 0) with w = 2.5."""
    from open_clip.tokenizer import SimpleTokenizer
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    n_px = 32
    transform = Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                         lambda im: im.convert("RGB"), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    tok = SimpleTokenizer()
    sot, eot = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]
    prefix = "A photo depicts"
    if prefix[-1] != " ":
        prefix += " "
    rows = []
    for caption in captions:
        ids = [sot, *tok.encode(prefix + caption), eot]
        if len(ids) > 77:
            ids = ids[:77]
            ids[-1] = eot
        rows.append(ids + [0] * (77 - len(ids)))
    with torch.no_grad():
        img = np.stack([model.encode_image(transform(Image.open(p))[None])[0].numpy() for p in images])
        txt = model.encode_text(torch.tensor(rows)).numpy()
    img = img.astype(np.float64)
    txt = txt.astype(np.float64)
    img = img / np.sqrt(np.sum(img ** 2, axis=1, keepdims=True))
    txt = txt / np.sqrt(np.sum(txt ** 2, axis=1, keepdims=True))
    return 2.5 * np.clip(np.sum(img * txt, axis=1), 0, None)


def test_clip_s_matches_slow_reference(tiny_clip, tmp_path):
    config, checkpoint = tiny_clip
    scorer = load_scorer(f"{config}:{checkpoint}")
    saved = torch.load(checkpoint)
    assert all(torch.equal(v, saved[k]) for k, v in scorer.model.state_dict().items())  # the weights, not random
    long = " ".join(["a red cat sits on a blue mat beside a small dog"] * 12)  # ~130 tokens: truncated
    captions = ["A cat.", "two dogs playing in the grass near a bench", "", long, "a photo of nothing at all",
                "There is a person holding an umbrella. The sky is grey."]
    images = _images(tmp_path)
    got = np.array(scorer.score(images, captions, batch_size=4))  # batches cut across the list
    want = _reference_clip_s(scorer.model, images, captions)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # truncation: words past the 77-token context change nothing
    assert scorer.score(images[3:4], [long + " and a giraffe"]) == pytest.approx(got[3:4].tolist(), abs=1e-7)
    assert scorer.describe() == {"model": f"{config}:{checkpoint}", "weights": str(checkpoint), "w": 2.5,
                                 "prefix": "A photo depicts ", "context_length": 77, "dtype": "float32"}


def test_clip_s_formula():
    img = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[6.0, 8.0], [-1.0, 0.1], [1.0, 1.0]])  # cos 1, negative (clamped to 0), 1/sqrt(2)
    np.testing.assert_allclose(clip_s(img, txt), [2.5, 0.0, 2.5 / np.sqrt(2)])


def test_spec_errors_are_one_clear_line(tiny_clip, tmp_path, monkeypatch):
    config, checkpoint = tiny_clip
    cases = {
        "ViT-B-32": "no weights given (random weights score nothing)",
        "NoSuchNet:openai": "unknown open_clip model 'NoSuchNet'",
        f"ViT-B-32:{tmp_path / 'missing.pt'}": "checkpoint file",
        "ViT-B-32:no_such_tag": "is neither a checkpoint file nor a pretrained tag of ViT-B-32 (openai,",
        f"{tmp_path / 'nope.json'}:{checkpoint}": "model config",
        f"{config}": "no weights given",
    }
    for spec, message in cases.items():
        with pytest.raises(ClipScoreError, match=r"^--clipscore ") as e:
            load_scorer(spec)
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ClipScoreError, match=r"cannot load .*wrong\.pt into open_clip model mmeff-tiny-clip"):
        load_scorer(f"{config}:{wrong}")
    # a pretrained tag offline, not in the cache: refused at once, naming the problem and the way out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipScoreError, match="not in the Hugging Face cache and the hub is offline") as e:
        load_scorer("ViT-B-32:openai", cache_dir=str(tmp_path / "hub"))
    assert "--clipscore ViT-B-32:PATH" in str(e.value)
    # online but the download fails (no network): one line too, not open_clip's traceback
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    with pytest.raises(ClipScoreError, match=r"cannot get the weights of pretrained tag 'openai' .*no network"):
        load_scorer("ViT-B-32:openai", cache_dir=str(tmp_path / "hub"))


def test_local_dir_model(tiny_clip, tmp_path):
    config, checkpoint = tiny_clip
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    with pytest.raises(ClipScoreError, match="holds no weights"):
        load_scorer(f"local-dir:{folder}")
    (folder / "open_clip_pytorch_model.bin").write_bytes(checkpoint.read_bytes())
    images, captions = _images(tmp_path)[:2], ["a cat", "a dog"]
    assert load_scorer(f"local-dir:{folder}").score(images, captions) == pytest.approx(
        load_scorer(f"{config}:{checkpoint}").score(images, captions), abs=1e-7)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ClipScoreError, match=r'pip install "mmeff\[clip\]"'):
        import_open_clip()


def _eval(tiny_model_dir, bench: Path, out: Path, *extra: str):
    args = ["eval", "--model", str(tiny_model_dir("llava")), "--preset", "fastv", "--tasks", "chair", "--data",
            str(bench), "--limit", "3", "--chair-max-new-tokens", "8", "--n-boot", "200", "--no-progress",
            "--output", str(out), *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_run(tiny_model_dir, bench, tiny_clip, tmp_path_factory) -> Path:
    config, checkpoint = tiny_clip
    out = tmp_path_factory.mktemp("clip_run") / "run"
    result = _eval(tiny_model_dir, bench, out, "--clipscore", f"{config}:{checkpoint}", "--log-samples")
    assert result.exit_code == 0, result.output
    return out


def test_eval_clipscore_column_with_ci(clip_run, bench, tiny_clip):
    config, checkpoint = tiny_clip
    spec = f"{config}:{checkpoint}"
    out = clip_run
    res = json.loads((out / "results.json").read_text())
    assert res["clipscore"]["model"] == spec and res["clipscore"]["w"] == 2.5
    none, fastv = res["runs"]
    scorer = load_scorer(spec)
    per = {}
    for run in (none, fastv):
        log = [json.loads(x) for x in (out / "samples" / run["preset"] / "chair.jsonl").read_text().splitlines()]
        assert len(log) == 3 and all("clip_s" in r for r in log)  # per-caption scores in the sample log
        images = [bench / "images" / f"synth_{int(r['id']):012d}.jpg" for r in log]
        np.testing.assert_allclose([r["clip_s"] for r in log], scorer.score(images, [r["answer"] for r in log]),
                                   atol=1e-6)
        per[run["preset"]] = np.array([r["clip_s"] for r in log])
        assert run["tasks"]["chair"]["clip_s"] == pytest.approx(per[run["preset"]].mean())
    d = fastv["delta"]["chair"]["clip_s"]
    want = paired_bootstrap(per["none"], per["fastv"], lambda x: x.mean(axis=1), n_boot=200, seed=0)
    assert (d["delta"], d["lo"], d["hi"]) == pytest.approx(want)
    assert d["lo"] <= d["delta"] <= d["hi"]
    assert set(fastv["delta"]["chair"]) == {"chair_s", "chair_i", "recall", "clip_s"}
    md = (out / "results.md").read_text()
    assert "| CLIP-S |" in md.replace("CHAIR recall | CLIP-S |", "| CLIP-S |") and "chair clip_s" in md
    assert f"with `{spec}`" in md
    assert json.loads((out / "run.json").read_text())["clipscore"] == spec  # --resume needs the same model


def test_interrupted_while_scoring_resumes(tiny_model_dir, bench, tiny_clip, clip_run, tmp_path, monkeypatch):
    """A kill between the presets' CLIP-S leaves one log scored, one not; --resume scores the rest only and gives
    the uninterrupted numbers."""
    from mmeff_lab.evaluation import clipscore
    from mmeff_lab.evaluation.results import strip_timing

    config, checkpoint = tiny_clip
    spec = f"{config}:{checkpoint}"
    real = clipscore.ClipScorer.score
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(clipscore.ClipScorer, "score", interrupted)
    out = tmp_path / "run"
    result = _eval(tiny_model_dir, bench, out, "--clipscore", spec, "--log-samples")
    assert result.exit_code == 130 and "continue with" in result.output
    logs = [[json.loads(x) for x in (out / "samples" / p / "chair.jsonl").read_text().splitlines()]
            for p in ("none", "fastv")]
    assert all("clip_s" in r for r in logs[0]) and not any("clip_s" in r for r in logs[1])
    calls.clear()
    result = _eval(tiny_model_dir, bench, out, "--clipscore", spec, "--log-samples", "--resume")
    assert result.exit_code == 0, result.output
    assert calls == [3]  # only fastv's captions were left
    got = strip_timing(json.loads((out / "results.json").read_text()))
    want = strip_timing(json.loads((clip_run / "results.json").read_text()))
    assert got == want


def test_eval_without_clipscore_says_how(tiny_model_dir, bench, tmp_path):
    out = tmp_path / "plain"
    result = _eval(tiny_model_dir, bench, out)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["clipscore"] is None
    assert "clip_s" not in res["runs"][0]["tasks"]["chair"] and "clip_s" not in res["runs"][1]["delta"]["chair"]
    md = (out / "results.md").read_text()
    assert "CLIP-S" not in md.split("\n\n")[2]  # no column in the table
    assert "*CLIP-S* (CLIPScore" in md and "`--clipscore MODEL:PRETRAINED`" in md
    result = _eval(tiny_model_dir, bench, tmp_path / "bad", "--tasks", "pope_random", "--clipscore", "ViT-B-32:x")
    assert result.exit_code == 2 and "--clipscore scores the chair task's captions" in result.output
    result = _eval(tiny_model_dir, bench, tmp_path / "bad", "--clipscore", "ViT-B-32")
    assert result.exit_code == 2 and "no weights given" in result.output
    assert not (tmp_path / "bad").exists()  # refused before the output folder is claimed


def test_score_chair_clipscore(bench, tiny_clip, tmp_path):
    config, checkpoint = tiny_clip
    spec = f"{config}:{checkpoint}"
    gt = json.loads((bench / "chair" / "synth_image_objects.json").read_text())
    ids = sorted(int(i) for i in gt)[:3]
    captions = [{"image_id": i, "caption": f"a scene with {', '.join(gt[str(i)][:2])} and a cat"} for i in ids]
    predictions = tmp_path / "captions.jsonl"
    predictions.write_text("".join(json.dumps(c) + "\n" for c in captions))
    result = runner.invoke(app, ["score", "chair", "--predictions", str(predictions), "--data", str(bench),
                                 "--clipscore", spec, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "chair_scores.json").read_text())
    want = load_scorer(spec).score([bench / "images" / f"synth_{i:012d}.jpg" for i in ids],
                                   [c["caption"] for c in captions])
    np.testing.assert_allclose([s["clip_s"] for s in scores["sentences"]], want, atol=1e-6)
    assert scores["overall_metrics"]["CLIPScore"] == pytest.approx(np.mean(want))
    assert "CLIPScore" in result.output
    result = runner.invoke(app, ["score", "chair", "--predictions", str(predictions), "--data", "coco",
                                 "--clipscore", spec])
    assert result.exit_code == 2 and "--clipscore needs the images" in result.output
    result = runner.invoke(app, ["score", "pope", "--predictions", str(predictions), "--clipscore", spec])
    assert result.exit_code == 2 and "applies to mmeff score chair only" in result.output
