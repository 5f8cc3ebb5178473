"""``mmeff score pope|chair|mme``: the official metrics on answers produced by any model or server.

Inputs are the official scripts' formats:
* POPE: answers as JSON lines ``{question_id, text}``, matched to a question file (``--questions`` = a file
  or a split name ``random|popular|adversarial``, default ``random``, from ``--data``);
* CHAIR: captions as a JSON list or JSON lines ``{image_id, caption}``; ground truth (``--annotations``) =
  a ``{image_id: [objects]}`` JSON (``.json`` or ``.json.gz``) or a folder with COCO ``instances_*.json`` and
  ``captions_*.json`` (built the official way), default from ``--data``;
* MME: a folder of per-subtask result files ``<subtask>.txt`` (or one such file) with
  ``image<TAB>question<TAB>answer<TAB>prediction`` lines.

``--data``: ``synthetic`` (default, as for ``mmeff eval``), a synthetic benchmark folder, or ``coco`` / a real
data folder: the shipped official POPE questions and CHAIR ground truth of COCO 2014.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mmeff.errors import MmeffError

BENCHMARKS = ("pope", "chair", "mme")


def _data(data: str) -> Any:
    from mmeff_lab.evaluation.tasks import DataSource, resolve_data

    if data == "coco":
        return DataSource("real", Path("."))  # only the shipped question / ground-truth files are read
    return resolve_data(data)


def score_pope(predictions: Path, questions: str, data: str) -> dict[str, Any]:
    from mmeff_lab.evaluation import pope

    if questions in ("random", "popular", "adversarial"):
        split = f"pope_{questions}"
        path = _data(data).pope_file(split)
        qs = pope.load_questions(path) if path is not None else pope.load_split(split)
    else:
        qs = pope.load_questions(questions)
    answers = pope.load_answers(predictions, qs)
    return pope.pope_metrics(answers, [q.label for q in qs])


def _ground_truth(annotations: Path | None, data: str) -> dict[int, frozenset[str]]:
    from mmeff_lab.evaluation import chair
    from mmeff_lab.evaluation.errors import DataError
    from mmeff_lab.evaluation.tasks import load_plain_ground_truth

    if annotations is None:
        return _data(data).chair_ground_truth
    if annotations.is_dir():
        instances = sorted(annotations.glob("instances_*.json"))
        captions = sorted(annotations.glob("captions_*.json"))
        if not instances or not captions:
            raise DataError(annotations, "need instances_*.json and captions_*.json (COCO annotation files)")
        return chair.ground_truth_from_coco(instances, captions)
    if annotations.name.endswith(".gz"):
        return chair.load_ground_truth(annotations)
    return load_plain_ground_truth(annotations)


def score_chair(predictions: Path, annotations: Path | None, data: str) -> dict[str, Any]:
    """The official output document: ``{"overall_metrics": {...}, "sentences": [...]}``."""
    from mmeff_lab.evaluation import chair

    result = chair.evaluate_chair(chair.load_captions(predictions), _ground_truth(annotations, data))
    return {"overall_metrics": result.metrics, "sentences": result.sentences}


def score_mme(predictions: Path) -> dict[str, Any]:
    from mmeff_lab.evaluation import mme

    if predictions.is_dir():
        results = mme.load_results_dir(predictions)
    else:
        if predictions.stem not in mme.SUBTASKS:
            raise MmeffError(f"{predictions}: a single MME result file must be named <subtask>.txt with subtask one "
                             f"of {', '.join(mme.SUBTASKS)}")
        results = {predictions.stem: mme.load_results(predictions)}
    return mme.mme_scores(results)


def _show(benchmark: str, scores: dict[str, Any]) -> None:
    table = Table("metric", "value", title=f"{benchmark} scores")
    if benchmark == "pope":
        rows = {k: scores[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "non_yes_no")}
    elif benchmark == "chair":
        rows = scores["overall_metrics"]
    else:
        rows = {"perception": "–" if scores["perception"] is None else scores["perception"],
                "cognition": "–" if scores["cognition"] is None else scores["cognition"],
                **{s: m["score"] for s, m in scores["subtasks"].items()},
                "unparsed answers": sum(m["n_other"] for m in scores["subtasks"].values())}
    for k, v in rows.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    if benchmark == "mme":
        for total, why in scores["totals_missing"].items():
            Console(stderr=True).print(f"note: no MME {total} total: {why}", highlight=False)
    if benchmark == "pope" and scores["non_yes_no"]:
        Console(stderr=True).print(f"note: {scores['non_yes_no']} of {scores['n']} answers say neither yes nor no; "
                                   "the official rule scores them as yes", highlight=False)


def score_command(
    benchmark: str = typer.Argument(..., help="pope, chair or mme"),
    predictions: Path = typer.Option(..., "--predictions", help="Answers / captions file (MME: folder or file)."),
    questions: str = typer.Option("random", "--questions", help="POPE: question file, or random|popular|adversarial."),
    annotations: Path | None = typer.Option(None, "--annotations", help="CHAIR ground truth (file or COCO folder)."),
    data: str = typer.Option("synthetic", "--data", help="synthetic, a benchmark folder, or coco."),
    output: Path | None = typer.Option(None, "--output", help="Write DIR/<benchmark>_scores.json."),
) -> None:
    """Score answers with the official POPE / CHAIR / MME metrics."""
    from mmeff_lab.evaluation.results import atomic_write_text

    if benchmark == "pope":
        scores = score_pope(predictions, questions, data)
    elif benchmark == "chair":
        scores = score_chair(predictions, annotations, data)
    elif benchmark == "mme":
        scores = score_mme(predictions)
    else:
        raise MmeffError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    if output is not None:
        atomic_write_text(output / f"{benchmark}_scores.json", json.dumps(scores, indent=1) + "\n")
    _show(benchmark, scores)


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
