"""``mmeff eval``: results files and schema, fastv's measured cost, kill + resume, 2-process data parallelism,
and clear errors. Tiny random models on a tiny synthetic benchmark keep it fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.evaluation.results import strip_timing
from mmeff_lab.evaluation.tasks import parse_tasks
from mmeff_lab.models.loading import ModelLoadError, ensure_tiny, load_model
from mmeff_lab.reference.synthetic import ensure_benchmarks

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_benchmarks(tmp_path_factory.mktemp("bench"), n_pope_images=2, n_chair_images=2, n_mme_images=1)


@pytest.fixture(scope="module")
def llava(tiny_model_dir) -> Path:
    return tiny_model_dir("llava")


def eval_args(model: Path, bench: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--preset", "fastv,none", "--tasks", "pope_random,chair,mme",
            "--data", str(bench), "--limit", "3", "--batch-size", "1", "--chair-max-new-tokens", "8",
            "--n-boot", "200", "--no-progress", "--output", str(out), *extra]


def invoke(args: list[str]):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic as the OMP_NUM_THREADS=1 subprocesses compared against
    try:
        return runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)


def sub_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def reference(llava, bench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    result = invoke(eval_args(llava, bench, out, "--log-samples"))
    assert result.exit_code == 0, result.output
    return out


def test_results_files_and_schema(reference):
    res = json.loads((reference / "results.json").read_text())
    assert res["schema"] == "mmeff.eval/1" and res["generation"]["chair_max_new_tokens"] == 8
    assert [r["preset"] for r in res["runs"]] == ["none", "fastv"]  # none first, always
    none, fastv = res["runs"]
    assert set(none["tasks"]) == {"pope_random", "chair", "mme"}
    assert set(none["tasks"]["pope_random"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    assert none["tasks"]["pope_random"]["n"] == 3
    assert set(none["tasks"]["chair"]) >= {"chair_s", "chair_i", "recall", "len", "n"}
    assert none["tasks"]["chair"]["n"] == 2
    assert set(none["tasks"]["mme"]["subtasks"]) == {"existence", "count", "position", "color"}
    assert set(none["cost"]) >= {"visual_tokens_in", "visual_tokens_kept", "kv_cache_bytes", "prefill_ms",
                                 "tokens_per_s", "peak_memory_bytes"}
    assert none["cost"]["peak_memory_bytes"] is None  # CPU
    # tiny llava: 16 patch tokens per image; fastv (k=2, ratio 0.5) keeps 16 in layers 0-1 and 8 in 2-3
    assert none["cost"]["visual_tokens_in"] == none["cost"]["visual_tokens_kept"] == 16
    assert fastv["cost"]["visual_tokens_kept"] == pytest.approx(12.0)
    assert fastv["cost"]["kv_cache_bytes"] < none["cost"]["kv_cache_bytes"]
    assert "delta" not in none
    for task, metrics in {"pope_random": ("f1", "accuracy"), "chair": ("chair_s", "chair_i", "recall"),
                          "mme": ("perception",)}.items():
        for m in metrics:
            d = fastv["delta"][task][m]
            assert d["lo"] <= d["delta"] <= d["hi"], (task, m, d)
    md = (reference / "results.md").read_text()
    assert "| none |" in md and "| fastv |" in md and "95% paired-bootstrap" in md
    assert "*visual tokens kept*: visual tokens each decoder layer attends to" in md and "on the CPU" in md
    assert none["tasks"]["pope_random"]["non_yes_no"] >= 0 and none["tasks"]["mme"]["unparsed"] >= 0
    assert (reference / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (reference / "samples" / "fastv" / "pope_random.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["1", "2", "3"]
    words = json.loads((reference / "samples" / "none" / "chair_words.json").read_text())
    assert len(words["sentences"]) == 2 and "mscoco_generated_words" in words["sentences"][0]


def test_kill_and_resume_equals_uninterrupted(llava, bench, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmeff_lab.cli", *eval_args(llava, bench, out)]
    proc = subprocess.Popen(cmd, env=sub_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "samples" / "none" / "pope_random.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"the run was not killed midway (rc {rc}): {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "results.json").exists()
    # a cut last line, as a kill during a write leaves it
    with open(log, "a") as f:
        f.write('{"id": "3", "answ')
    again = invoke(eval_args(llava, bench, out))
    assert again.exit_code == 2 and "--resume" in again.output  # refuses to overwrite silently
    result = invoke(eval_args(llava, bench, out, "--resume"))
    assert result.exit_code == 0, result.output
    got = strip_timing(json.loads((out / "results.json").read_text()))
    want = strip_timing(json.loads((reference / "results.json").read_text()))
    assert got == want
    assert not (out / "samples").exists()  # without --log-samples the logs go once the results are written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_single_process_numbers(llava, bench, reference, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.fail("the accelerate launcher is not on PATH")
    out = tmp_path / "dp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "mmeff_lab.cli", *eval_args(llava, bench, out)]
    proc = subprocess.run(cmd, env=sub_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = strip_timing(json.loads((out / "results.json").read_text()))
    want = strip_timing(json.loads((reference / "results.json").read_text()))
    assert got == want


def test_qwen_batched_run(tiny_model_dir, bench, tmp_path):
    out = tmp_path / "qwen"
    args = ["eval", "--model", str(tiny_model_dir("qwen2_vl")), "--preset", "fastv", "--tasks", "pope_random",
            "--data", str(bench), "--limit", "3", "--batch-size", "2", "--n-boot", "50", "--no-progress",
            "--output", str(out)]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    none, fastv = json.loads((out / "results.json").read_text())["runs"]
    assert none["cost"]["visual_tokens_in"] > 0
    assert fastv["cost"]["visual_tokens_kept"] < none["cost"]["visual_tokens_kept"]
    assert none["tasks"]["pope_random"]["n"] == 3


def test_unknown_task_lists_valid_ones(tmp_path):
    result = runner.invoke(app, ["eval", "--tasks", "pope,vqa", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown task 'vqa'" in result.output
    for name in ("pope", "pope_random", "pope_popular", "pope_adversarial", "chair", "mme"):
        assert name in result.output
    assert parse_tasks("pope,chair,pope_random") == ["pope_random", "pope_popular", "pope_adversarial", "chair"]


def test_bad_inputs(tmp_path, bench, llava):
    result = runner.invoke(app, ["eval", "--preset", "none,nosuch", "--output", str(tmp_path / "a")])
    assert result.exit_code == 2 and "nosuch" in result.output and "fastv" in result.output
    result = runner.invoke(app, ["eval", "--resume", "--output", str(tmp_path / "b"), "--data", str(bench),
                                 "--model", str(llava)])
    assert result.exit_code == 2 and "nothing to resume" in result.output
    result = runner.invoke(app, ["eval", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "c")])
    assert result.exit_code == 2 and "data folder not found" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny-gpt2", "--data", str(bench), "--tasks", "pope_random",
                                 "--limit", "1", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "unknown tiny family 'gpt2'" in result.output
    result = runner.invoke(app, ["eval", "--cuda-graphs", "--output", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--cuda-graphs needs --device cuda" in result.output
    for claimed in "cde":
        assert not (tmp_path / claimed).exists()  # bad input claims no folder


def test_graphs_only_for_presets_that_allow_them():
    from mmeff_lab.evaluation.runner import graphable

    assert all(graphable(p, "llava") for p in ("none", "fastv", "vflowopt-90", "dyvte", "explain-50"))
    assert not any(graphable(p, "llava") for p in ("var", "zipvl", "vcd", "pai", "vhr", "fia", "fastv+vcd"))


def test_load_model_specs(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))
    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny("llava")
    assert path == tmp_path / "cache" / "models" / "tiny-llava" and (path / "config.json").is_file()
    assert ensure_tiny("llava") == path  # built once
    model, _, family = load_model("tiny-llava")
    assert family == "llava" and model.dtype == torch.float32 and not model.training


def test_qwen_processor_without_video_config_even_with_torchvision(monkeypatch):
    # the shipped Qwen reference has no video processor config: with torchvision present, AutoProcessor would
    # silently hand back the bare tokenizer (seen on transformers 5.17); the loader must give the image processor
    import transformers.utils

    from mmeff_lab.models.factory import Qwen2VLProcessorNoVideo
    from mmeff_lab.models.loading import _load_processor, resolve_spec

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    processor = _load_processor(resolve_spec("reference-qwen2vl"), "qwen2_vl")
    assert isinstance(processor, Qwen2VLProcessorNoVideo) and processor.tokenizer is not None


def test_refused_runs_claim_no_folder(llava, bench, tmp_path):
    """Everything that can be validated is, before the output folder exists: a preset this model refuses (not
    after the baseline ran), a checkpoint without a chat template or with pickle weights only."""
    out = tmp_path / "a"
    result = invoke([*eval_args(llava, bench, out)[:4], "var", *eval_args(llava, bench, out)[5:]])
    assert result.exit_code == 2 and "preset 'var' cannot run on this llava model" in result.output
    assert not out.exists()
    no_template = tmp_path / "no_template"
    shutil.copytree(llava, no_template)
    for name in ("chat_template.json", "chat_template.jinja"):
        (no_template / name).unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = no_template / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg.pop("chat_template", None)
            path.write_text(json.dumps(cfg))
    result = invoke(eval_args(no_template, bench, tmp_path / "b"))
    assert result.exit_code == 2 and "no chat template" in result.output and not (tmp_path / "b").exists()
    pickled = tmp_path / "pickled"
    shutil.copytree(llava, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    result = invoke(eval_args(pickled, bench, tmp_path / "c"))
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: cannot load model")
    assert not (tmp_path / "c").exists()


def test_a_finished_folder_is_reported_not_recomputed(llava, bench, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = invoke(eval_args(llava, bench, out, "--log-samples"))
    assert result.exit_code == 2 and "holds a finished evaluation; --resume reports it, --overwrite" in result.output
    import mmeff_lab.evaluation.runner as runner_module

    monkeypatch.setattr(runner_module, "run_task", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    result = invoke(eval_args(llava, bench, out, "--log-samples", "--resume"))
    assert result.exit_code == 0 and "nothing to do" in result.output and "pope_random" in result.output
    monkeypatch.undo()
    before = (out / "results.json").stat().st_mtime_ns
    result = invoke(eval_args(llava, bench, out, "--log-samples", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "results.json").stat().st_mtime_ns != before
    got = strip_timing(json.loads((out / "results.json").read_text()))
    assert got == strip_timing(json.loads((reference / "results.json").read_text()))


def test_ctrl_c_says_where_and_how_to_resume(llava, bench, tmp_path, monkeypatch):
    import mmeff_lab.evaluation.runner as runner_module

    real = runner_module.run_task
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first task's samples are written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "run_task", interrupted)
    monkeypatch.setattr(sys, "argv", ["mmeff", *eval_args(llava, bench, tmp_path / "run")])
    result = invoke(eval_args(llava, bench, tmp_path / "run"))
    assert result.exit_code == 130
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("interrupted at none / chair, 0 of 2 samples done; continue with: mmeff eval ")
    assert last.endswith(" --resume")
    monkeypatch.undo()
    result = invoke(eval_args(llava, bench, tmp_path / "run", "--resume"))
    assert result.exit_code == 0, result.output
