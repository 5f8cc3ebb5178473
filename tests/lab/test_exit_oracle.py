"""mmeff_lab.evaluation.exits: forced-exit presets and the oracle exit layer read from sample logs."""

from __future__ import annotations

import json
from pathlib import Path

from mmeff.presets import load_preset_file
from mmeff_lab.evaluation import exits


def _log(root: Path, preset: str, task: str, answers: dict[str, str]) -> None:
    folder = root / "samples" / preset.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": q, "answer": a}) + "\n" for q, a in answers.items()]
    (folder / f"{task}.jsonl").write_text("".join(lines))


def test_exit_presets_are_fastv_dropping_everything(tmp_path: Path) -> None:
    paths = exits.write_exit_presets(tmp_path, 4)
    assert [p.name for p in paths] == ["exit-1.toml", "exit-2.toml", "exit-3.toml"]
    (name, preset), = load_preset_file(paths[1]).items()
    assert name == "exit-2" and preset.method == "fastv" and preset.fields == {"k": 2, "ratio": 1.0, "query": "all"}


def test_oracle_is_the_earliest_exit_with_the_full_answer(tmp_path: Path) -> None:
    full = {"a": "Yes", "b": "No", "c": "Yes"}
    _log(tmp_path, "none", "pope_random", full)
    _log(tmp_path, "x/exit-1.toml", "pope_random", {"a": "no", "b": "no", "c": "no"})
    _log(tmp_path, "x/exit-2.toml", "pope_random", {"a": "yes", "b": "no", "c": "no"})
    _log(tmp_path, "x/exit-3.toml", "pope_random", {"a": "no", "b": "yes", "c": "no"})
    t = exits.oracle_report(tmp_path, 4)["tasks"]["pope_random"]
    assert t["agree_by_exit"] == {1: 1 / 3, 2: 2 / 3, 3: 0.0}
    assert t["oracle_mean_exit"] == (2 + 1 + 4) / 3  # c never agrees: it needs every layer
