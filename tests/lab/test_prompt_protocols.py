"""Prompt protocols (``mmeff eval --prompt-protocol``): the chat text each family gets per benchmark, written out
by hand here; the protocol recorded in results.json / results.md; resume refusing another protocol; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmeff.families.prompt import chat_text
from mmeff_lab.cli import app
from mmeff_lab.evaluation import prompt_protocols as pp
from mmeff_lab.models.loading import _load_processor
from mmeff_lab.reference.synthetic import ensure_benchmarks

runner = CliRunner()

POPE_Q = "Is there a dog in the image?"
MME_Q = "Is there a train in this image? Please answer yes or no."
VICUNA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
QWEN_SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_IMG = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_END = "<|im_end|>\n<|im_start|>assistant\n"

LLAVA_15 = {
    "pope": VICUNA + " USER: <image>\nIs there a dog in the image?\nAnswer the question using a single word or "
                     "phrase. ASSISTANT:",
    "mme": VICUNA + " USER: <image>\nIs there a train in this image?\nAnswer the question using a single word or "
                    "phrase. ASSISTANT:",
    "chair": VICUNA + " USER: <image>\nPlease describe this image in detail. ASSISTANT:",
}
QWEN2_VL = {
    "pope": QWEN_SYS + QWEN_IMG + "Is there a dog in the image? Please answer yes or no." + QWEN_END,
    "mme": QWEN_SYS + QWEN_IMG + "Is there a train in this image? Please answer yes or no." + QWEN_END,
    "chair": QWEN_SYS + QWEN_IMG + "Please describe this image in detail." + QWEN_END,
}
EXPECTED = {  # family -> (default protocol, benchmark -> chat text)
    "llava": ("llava-1.5", LLAVA_15),
    "llava_next": ("llava-1.5", LLAVA_15),
    "qwen2_vl": ("qwen2-vl", QWEN2_VL),
    "qwen2_5_vl": ("qwen2-vl", QWEN2_VL),
}
RAW = {
    "llava": {"pope": "USER: <image>\nIs there a dog in the image? ASSISTANT:",
              "mme": "USER: <image>\nIs there a train in this image? Please answer yes or no. ASSISTANT:",
              "chair": "USER: <image>\nPlease describe this image in detail. ASSISTANT:"},
    "qwen2_vl": {"pope": QWEN_SYS + QWEN_IMG + "Is there a dog in the image?" + QWEN_END,
                 "mme": QWEN_SYS + QWEN_IMG + "Is there a train in this image? Please answer yes or no." + QWEN_END,
                 "chair": QWEN_SYS + QWEN_IMG + "Please describe this image in detail." + QWEN_END},
}
QUESTIONS = {"pope": ("pope_random", POPE_Q), "mme": ("mme", MME_Q), "chair": ("chair", None)}


def _processor(path: Path):
    return _load_processor(path, json.loads((path / "config.json").read_text())["model_type"])


def _asked(protocol: pp.Protocol, processor) -> dict[str, str]:
    system = pp.system_turn(protocol, processor)
    return {b: chat_text(processor, protocol.prompt(task, q), system=system) for b, (task, q) in QUESTIONS.items()}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_default_protocol_per_family(tiny_model_dir, family):
    name, expected = EXPECTED[family]
    protocol = pp.resolve("family", family, str(tiny_model_dir(family)))
    assert protocol.name == name
    assert _asked(protocol, _processor(tiny_model_dir(family))) == expected


@pytest.mark.parametrize("family", list(RAW))
def test_raw_protocol_is_the_question_as_is(tiny_model_dir, family):
    assert _asked(pp.resolve("raw", family, "x"), _processor(tiny_model_dir(family))) == RAW[family]


def test_shipped_protocols_and_their_defaults(tiny_model_dir):
    assert set(pp.shipped_names()) >= {"llava-1.5", "qwen2-vl", "lmms-eval", "raw", "mmeff-0"}
    for name in pp.shipped_names():
        p = pp.load(name)
        assert p.name == name and p.source and p.description
        assert all(p.tasks[b].template for b in pp.BENCHMARKS)
    # the reference models keep the prompts they were trained and measured with
    assert pp.resolve("family", "llava", "reference-llava").name == "mmeff-0"
    assert pp.resolve("family", "qwen2_vl", "reference-qwen2vl").name == "mmeff-0"
    assert pp.resolve("family", "some_new_family", "x").name == "raw"  # no published protocol: the question as is
    legacy = pp.load("mmeff-0")  # = the prompts before protocols existed (tasks.POPE_SUFFIX, MME raw, no system)
    assert _asked(legacy, _processor(tiny_model_dir("llava"))) == {
        "pope": "USER: <image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase. "
                "ASSISTANT:", "mme": RAW["llava"]["mme"], "chair": RAW["llava"]["chair"]}
    lmms = pp.load("lmms-eval")
    assert lmms.system is None and lmms.prompt("mme", MME_Q) == ("Is there a train in this image?\nAnswer the "
                                                                 "question using a single word or phrase.")


def test_protocol_file(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\ndescription = "d"\nsource = "ours"\nsystem = "Be brief."\n'
                 '[pope]\ntemplate = "Q: {question}"\n[mme]\nremove = " Please answer yes or no."\n'
                 'template = "{question} (yes/no)"\n[chair]\ntemplate = "Describe."\n')
    p = pp.resolve(str(f), "llava", "x")
    assert (p.name, p.system, p.file) == ("mine", "Be brief.", str(f))
    assert p.prompt("pope_adversarial", POPE_Q) == "Q: Is there a dog in the image?"
    assert p.prompt("mme", MME_Q) == "Is there a train in this image? (yes/no)"
    assert p.prompt("chair", None) == "Describe."
    f.write_text('name = "mine"\ndescription = "d"\nsource = "ours"\n[pope]\ntemplate = "no question"\n')
    with pytest.raises(pp.PromptProtocolError, match=r"\[pope\]: the template must contain \{question\}"):
        pp.load(str(f))


def test_unknown_protocol_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["eval", "--prompt-protocol", "nosuch", "--output", str(tmp_path / "a")])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert "unknown prompt protocol 'nosuch'" in last
    for name in ("family", "llava-1.5", "qwen2-vl", "raw", ".toml file"):
        assert name in last
    assert not (tmp_path / "a").exists()
    result = runner.invoke(app, ["eval", "--prompt-protocol", str(tmp_path / "gone.toml"), "--output",
                                 str(tmp_path / "b")])
    assert result.exit_code == 2 and "file not found" in result.output and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_benchmarks(tmp_path_factory.mktemp("bench"), n_pope_images=2, n_chair_images=2, n_mme_images=1)


def test_results_record_the_protocol_and_resume_refuses_another(tiny_model_dir, bench, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir("llava")), "--preset", "none", "--tasks", "pope_random,mme,chair",
            "--data", str(bench), "--limit", "2", "--chair-max-new-tokens", "4", "--n-boot", "20", "--no-progress",
            "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    p = res["prompt_protocol"]
    assert (p["requested"], p["name"], p["file"]) == ("family", "llava-1.5", "shipped:llava-1.5.toml")
    assert p["system"] == VICUNA and p["system_added"] is True
    mme_source = pp.load("llava-1.5").tasks["mme"].source
    assert p["tasks"]["mme"] == {"template": "{question}\nAnswer the question using a single word or phrase.",
                                 "remove": " Please answer yes or no.", "source": mme_source}
    assert set(p["rendered"]) == {"pope_random", "mme", "chair"}
    assert p["rendered"]["chair"] == LLAVA_15["chair"]
    for task in ("pope_random", "mme"):
        assert p["rendered"][task].startswith(VICUNA + " USER: <image>\n")
        assert p["rendered"][task].endswith("?\nAnswer the question using a single word or phrase. ASSISTANT:")
    md = (out / "results.md").read_text()
    assert "Prompt protocol `llava-1.5`" in md and "system prompt added" in md
    result = runner.invoke(app, [*args, "--resume", "--prompt-protocol", "raw"])
    assert result.exit_code == 2 and "prompt_protocol: was 'family', now 'raw'" in result.output
