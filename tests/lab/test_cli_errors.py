"""One error path for the whole command line: an expected failure is one line on stderr, exit code 2, and no
traceback unless ``mmeff --debug``; ``--device auto`` everywhere; every command resolves models the same way."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.cli.errors import describe
from mmeff_lab.models.loading import resolve_device

runner = CliRunner()

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@needs_no_cuda
@pytest.mark.parametrize("command", [["bench", "--device", "cuda"], ["eval", "--device", "cuda"],
                                     ["train", "dyvte", "--device", "cuda", "--output", "x"]])
def test_cuda_on_a_machine_without_it(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(runner.invoke(app, command), "--device cuda: no usable CUDA device here")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_device_auto_and_bad_devices():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    result = runner.invoke(app, ["bench", "--device", "gpu"])
    one_line_error(result, "--device must be auto, cpu, cuda or cuda:N, got 'gpu'")


def test_model_names_are_resolved_alike(tmp_path):
    # bench and tune accept what eval accepts, and name the valid forms when a name is none of them
    for command in (["bench", "--model", "reference", "--device", "cpu"],
                    ["tune", "vflowopt", "--model", "reference", "--budget", "0.5", "--device", "cpu",
                     "--output", str(tmp_path / "p.toml")]):
        one_line_error(runner.invoke(app, command), "reference: no such directory", "reference-llava", "tiny-<family>")
    assert not (tmp_path / "p.toml").exists()


def test_tune_accepts_a_shipped_model_name(tmp_path):
    out = tmp_path / "tuned.toml"
    result = runner.invoke(app, ["tune", "vflowopt", "--model", "tiny-llava", "--budget", "0.5", "--trials", "12",
                                 "--samples", "2", "--batch-size", "2", "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "method = \"vflowopt\"" in out.read_text()
    trials = [line for line in result.output.splitlines() if line.startswith("trial ")]
    assert [t.split()[1] for t in trials] == [f"{i}/12" for i in range(1, 13)]  # every trial, however it ended
    assert any(" completed: objective " in t for t in trials)
    assert all(" completed: " in t or " pruned: " in t for t in trials)


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, tmp_path):
    import mmeff_lab.evaluation.runner as runner_module

    def broken(cfg):
        raise ValueError("something\nwent wrong")

    monkeypatch.setattr(runner_module, "run_eval", broken)
    result = runner.invoke(app, ["eval", "--output", str(tmp_path / "o")])
    one_line_error(result, "ValueError: something went wrong", "mmeff --debug")
    result = runner.invoke(app, ["--debug", "eval", "--output", str(tmp_path / "o")])
    assert isinstance(result.exception, ValueError)


def test_describe_maps_environment_errors():
    assert describe(RuntimeError("Found no NVIDIA driver on your system."))[0].startswith("no usable CUDA device")
    assert describe(AssertionError("Torch not compiled with CUDA enabled"))[1]
    msg, expected = describe(OSError("We couldn't connect to 'https://huggingface.co' to load the files"))
    assert expected and "reference-llava" in msg
    assert describe(FileNotFoundError(2, "No such file", "a/b.json"))[0] == "file not found: a/b.json"
    assert describe(KeyError("x"))[1] is False


def test_presets_listing_is_readable():
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "t=39.26" in result.output and "t=39.26492840997221" not in result.output  # rounded settings
    var = next(line for line in result.output.splitlines() if line.startswith("│ var "))
    assert "needs a text model" in var  # the preset's requires line
