"""``lmms-eval --model mmeff`` end to end on CPU: a tiny LLaVA from the factory, a local task (YAML + JSON +
images written here; no hub), preset ``fastv``. lmms-eval's answers must equal mmeff's own eval path (the same
prompt through ``make_inputs``, greedy ``generate`` on the wrapped model), and each logged sample must carry
the preset's measured cost.

lmms-eval is not in the dev extra (``pip install -e ".[lmms]"``: ~1 GB, 71 packages, ~80 s); without it this
module is skipped. The CLI runs in a subprocess that finds ``--model mmeff`` through the ``lmms_eval.models``
entry point, declared by a throw-away dist-info on its path (the checkout need not be pip-installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]')")

import torch
from PIL import Image

import mmeff
from mmeff.families.prompt import chat_text, make_inputs
from mmeff_lab.integrations import lmms_eval as integration
from mmeff_lab.models.factory import load_tiny, random_image

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures_lmms"
ENTRY_POINT = "mmeff_lab.integrations.lmms_eval:manifest"
QUESTIONS = ["Is there a cat in the image?", "Is there a dog in the image?", "Is there a car in the image?",
             "Is there a bus in the image?"]
MAX_NEW_TOKENS = 8  # the task YAML's generation_kwargs


def _write_task(root: Path) -> list[dict]:
    docs = []
    for i, question in enumerate(QUESTIONS):
        random_image(i, size=(48 + 8 * i, 40)).save(root / f"img{i}.png")
        docs.append({"id": i, "image": f"img{i}.png", "question": question, "answer": "yes" if i % 2 else "no"})
    (root / "mmeff_yesno.json").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    shutil.copytree(FIXTURES, root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "plugin" / "mmeff_lmms_plugin-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmeff-lmms-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\nmmeff = {ENTRY_POINT}\n")
    return docs


@pytest.fixture(scope="module")
def lmms_run(tiny_model_dir, tmp_path_factory):
    """One CLI run: (model dir, docs, logged samples by doc_id, results.json)."""
    model = tiny_model_dir("llava")
    root = tmp_path_factory.mktemp("lmms")
    docs = _write_task(root)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "PYTHONPATH": os.pathsep.join([str(root / "plugin"), str(REPO), str(REPO / "lab"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmeff",
           "--model_args", f"pretrained={model},preset=fastv", "--tasks", "mmeff_yesno",
           "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "1",
           "--log_samples", "--output_path", str(root / "out")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = root / "out"
    samples_files = sorted(out.rglob("*_samples_mmeff_yesno.jsonl"))
    results_files = sorted(out.rglob("*_results.json"))
    assert proc.returncode == 0 and samples_files and results_files, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = {}
    for line in samples_files[-1].read_text().splitlines():
        rec = json.loads(line)
        samples[rec["doc_id"]] = rec
    return model, root, docs, samples, json.loads(results_files[-1].read_text())


def test_lmms_eval_answers_match_mmeff_eval_path(lmms_run):
    model_dir, root, docs, samples, _ = lmms_run
    assert sorted(samples) == list(range(len(docs)))
    model, processor = load_tiny(model_dir)
    handle = mmeff.wrap(model, "fastv")
    tokenizer = processor.tokenizer
    for i, doc in enumerate(docs):
        text = doc["question"] + "\nAnswer the question using a single word or phrase."
        # the prompt lmms-eval's llava_hf builds (its image token, then the text, through the chat template)
        lmms_prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{text}"}],
                                                    tokenize=False, add_generation_prompt=True)
        assert lmms_prompt == chat_text(processor, text)  # = mmeff eval's prompt
        with Image.open(root / doc["image"]) as im:
            image = im.convert("RGB")
        inputs = make_inputs(processor, [text], [[image]])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
        answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        sample = samples[i]
        assert sample["filtered_resps"] in (answer, [answer])
        cost = sample["token_counts"][0]
        stats = handle.stats
        assert cost["preset"] == "fastv"
        assert cost["input_tokens"] == inputs["input_ids"].shape[1]
        for key in integration.COST_FIELDS:
            assert cost[key] == pytest.approx(stats[key]), key
        assert cost["visual_tokens_kept"] < cost["visual_tokens_in"]  # fastv pruned


def test_lmms_eval_cost_summary(lmms_run):
    *_, samples, results = lmms_run
    summary = results["throughput"]
    for key in integration.COST_FIELDS:
        mean = sum(s["token_counts"][0][key] for s in samples.values()) / len(samples)
        assert summary[f"avg_mmeff_{key}"] == pytest.approx(mean), key
    assert summary["avg_mmeff_samples"] == len(samples)


def test_entry_point_declared_and_family_detection(tiny_model_dir):
    lab = tomllib.loads((REPO / "lab" / "pyproject.toml").read_text())["project"]
    assert lab["entry-points"]["lmms_eval.models"]["mmeff"] == ENTRY_POINT
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "lmms_eval.models" not in root.get("entry-points", {})  # the library's wheel has no mmeff_lab
    for project in (lab, root):
        assert any(dep.startswith("lmms-eval") for dep in project["optional-dependencies"]["lmms"])
    manifest = integration.manifest()
    assert manifest.model_id == "mmeff" and manifest.simple_class_path.endswith(".Mmeff")
    assert integration.family_of(str(tiny_model_dir("llava"))) == "llava_hf"
    assert integration.family_of("x", "llava_next") == "llava_hf"
    assert integration.family_of("x", "qwen2_5_vl") == "qwen2_5_vl"
    with pytest.raises(ValueError, match="family="):
        integration.family_of("x", "gpt2")
