"""lmms-eval's logged samples (``lmms_eval --log_samples``: ``<date>_samples_<task>.jsonl``) as POPE / MME answers.

One JSON object per line, written by lmms-eval's ``EvaluationTracker.save_results_samples``. lmms-eval 0.7 keeps
``doc_id``, ``target`` (``str`` of the doc's answer), ``filtered_resps`` (the answer lmms-eval scored: its
one-request wrapper flattened to the string; a list where there were several requests), ``resps`` only where it
differs, ``input`` (the prompt), ``doc_hash``, ``token_counts`` and each metric's per-sample payload — POPE
``pope_accuracy`` ... ``pope_yes_ratio`` = ``{question_id, score, prediction, ground_truth}``, MME
``mme_perception_score`` / ``mme_cognition_score`` (``mme_percetion_score`` in older versions) =
``{question_id, category, score}`` — but drops the dataset row. Older versions (and lm-eval-harness's layout) keep
the row, without its image, as ``doc``: POPE ``{id, question_id, question, answer, image_source, category}``, MME
``{question_id: "<subtask>/<image file>", question, answer, category}``, with ``resps`` / ``filtered_resps`` as
lists per request. The row wins where present; the metric payloads and ``target`` fill in otherwise.

The sample carries its question's label, so the score needs no question file: the official parsers and metrics
(:mod:`.pope`, :mod:`.mme`) are applied to the logged answers and labels — not lmms-eval's own aggregation, which
for POPE compares the lower-cased answer with "yes"/"no" exactly (so "Yes." counts as neither).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import mme, pope
from ._io import is_logged_sample, iter_json_lines
from .errors import DataError

# lmms-eval's POPE task names -> our split names (pope = lmms-lab/POPE's test split: the three splits mixed)
POPE_TASK_SPLITS = {"pope_adv": "pope_adversarial", "pope_pop": "pope_popular", "pope_random": "pope_random"}
FORMAT = "lmms-eval samples"


@dataclass(frozen=True)
class LoggedSample:
    line: int
    doc_id: str
    benchmark: str  # "pope" | "mme"
    answer: str  # the model's answer (filtered_resps)
    label: str  # "yes" | "no"
    question_id: str | None
    question: str | None  # the doc's question, else the prompt as sent
    image: str | None  # POPE: image_source as a file name; MME: the file name in question_id
    category: str | None  # POPE split / MME subtask


def is_samples_file(path: str | Path) -> bool:
    """Whether ``path``'s first non-blank line is an lmms-eval logged sample (False for text that is not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False
    if not first.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and is_logged_sample(obj)


def task_name(path: str | Path) -> str | None:
    """The lmms-eval task a samples file is of, from its name: ``<date>_samples_<task>.jsonl`` (0.7), or
    ``samples_<task>_<ISO date>.jsonl`` (older versions)."""
    m = re.search(r"samples_(.+?)(?:_\d{4}-\d\d-\d\dT[\d.\-]*)?\.jsonl$", Path(path).name)
    return m.group(1) if m else None


def _answer(value: Any, path: str | Path, lineno: int) -> str:
    """The first response: ``filtered_resps`` is a string, or lists of them (one per request / per sample)."""
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str):
        raise DataError(path, f"no response text in filtered_resps/resps (got {value!r})", lineno)
    return value


def _yes_no(value: Any, path: str | Path, lineno: int) -> str:
    label = str(value).lower().strip().replace(".", "")  # lmms-eval's own normalisation of the answer key
    if label not in ("yes", "no"):
        raise DataError(path, f"the sample's answer key is {value!r}, not yes/no", lineno)
    return label


def _benchmark(obj: dict[str, Any]) -> str | None:
    """pope / mme by the metric keys lmms-eval's tasks log, else by the doc's category."""
    if any(k.startswith("pope_") for k in obj):
        return "pope"
    if any(k.startswith("mme_") for k in obj):
        return "mme"
    doc = obj.get("doc")
    category = doc.get("category") if isinstance(doc, dict) else None
    if f"pope_{category}" in pope.POPE_SPLITS:
        return "pope"
    if category in mme.SUBTASKS:
        return "mme"
    return None


def _payload(obj: dict[str, Any]) -> dict[str, Any]:
    for key, value in obj.items():
        if key.startswith(("pope_", "mme_")) and isinstance(value, dict):
            return value
    return {}


def read_samples(path: str | Path, benchmark: str) -> list[LoggedSample]:
    """Every line of an lmms-eval samples file of ``benchmark`` (``pope`` / ``mme``); a line that is no logged
    sample, a sample of another benchmark or a repeated ``doc_id`` is one error naming the line."""
    out: list[LoggedSample] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path):
        if not is_logged_sample(obj):
            mixed = f" in a file of lmms-eval samples (line {min(seen.values())} is one)" if seen else ""
            raise DataError(path, f"not an lmms-eval logged sample (keys {sorted(obj)}; a sample has doc_id and "
                                  f"filtered_resps){mixed}: one format per file", lineno)
        kind = _benchmark(obj)
        if kind != benchmark:
            what = f"an lmms-eval sample of {kind}" if kind else "an lmms-eval sample of neither POPE nor MME"
            fix = f" (score it with mmeff score {kind})" if kind else ""
            raise DataError(path, f"{what}, not {benchmark}{fix}", lineno)
        doc_id = str(obj["doc_id"])
        if doc_id in seen:
            raise DataError(path, f"doc_id {doc_id} repeats line {seen[doc_id]} (two runs in one file?)", lineno)
        seen[doc_id] = lineno
        doc = obj.get("doc") if isinstance(obj.get("doc"), dict) else {}
        payload = _payload(obj)
        answer = _answer(obj["filtered_resps"] if "filtered_resps" in obj else obj["resps"], path, lineno)
        raw_label = doc.get("answer", obj.get("target", payload.get("ground_truth")))
        if raw_label is None:
            raise DataError(path, "no answer key (doc.answer / target)", lineno)
        qid = doc.get("question_id", payload.get("question_id"))
        question = doc.get("question", obj.get("input"))
        category = doc.get("category", payload.get("category"))
        if benchmark == "pope":
            source = doc.get("image_source")
            image = None if source is None else str(source) if Path(str(source)).suffix else f"{source}.jpg"
        else:
            if qid is None or category is None:
                raise DataError(path, "an MME sample needs its question_id (the image) and category", lineno)
            image = PurePosixPath(str(qid)).name
        out.append(LoggedSample(lineno, doc_id, benchmark, answer, _yes_no(raw_label, path, lineno),
                                None if qid is None else str(qid), question, image,
                                None if category is None else str(category)))
    if not out:
        raise DataError(path, "no samples in file")
    return out


def _pope_group(s: LoggedSample, task: str | None) -> str:
    if s.category is not None:
        return f"pope_{s.category}" if f"pope_{s.category}" in pope.POPE_SPLITS else s.category
    return POPE_TASK_SPLITS.get(task or "", "pope")


def pope_scores(path: str | Path) -> dict[str, Any]:
    """The official POPE metrics of a samples file: per split (the doc's category, else the task's split); a file
    with several splits gets ``splits`` as LLaVA's ``eval_pope.py`` prints them. Samples without a category from
    lmms-eval's mixed ``pope`` task are one group ``pope`` (all splits pooled, as lmms-eval reports it)."""
    samples = read_samples(path, "pope")
    task = task_name(path)
    groups: dict[str, list[LoggedSample]] = {}
    for s in samples:
        groups.setdefault(_pope_group(s, task), []).append(s)
    by_split = {name: pope.pope_metrics([s.answer for s in group], [s.label for s in group])
                for name, group in groups.items()}
    head: dict[str, Any] = {"format": FORMAT, "task": task}
    if len(by_split) == 1:
        (split, metrics), = by_split.items()
        return {**head, "split": split, **metrics}
    order = [*pope.POPE_SPLITS, *sorted(set(by_split) - set(pope.POPE_SPLITS))]
    return {**head, "splits": {k: by_split[k] for k in order if k in by_split}}


def mme_results(samples: Sequence[LoggedSample], path: str | Path) -> dict[str, list[mme.MMEResult]]:
    """Per subtask, the two questions of each image side by side (the result files' pairing), keyed as the release
    layout is read: subtask = the doc's category, image = the file name in its question_id, question = its text."""
    pairs: dict[str, dict[str, list[LoggedSample]]] = {}
    for s in samples:
        assert s.category is not None and s.image is not None and s.question_id is not None
        if s.category not in mme.SUBTASKS:
            raise DataError(path, f"category {s.category!r} is not an MME subtask ({', '.join(mme.SUBTASKS)})", s.line)
        folder = PurePosixPath(s.question_id).parts[0]
        if folder in mme.SUBTASKS and folder != s.category:
            raise DataError(path, f"question_id {s.question_id!r} is in subtask {folder}, its category says "
                                  f"{s.category}", s.line)
        pairs.setdefault(s.category, {}).setdefault(s.image, []).append(s)
    out: dict[str, list[mme.MMEResult]] = {}
    for subtask, images in pairs.items():
        rows: list[mme.MMEResult] = []
        for image, group in images.items():
            if len(group) != 2:
                raise DataError(path, f"{subtask}/{image} has {len(group)} questions in the samples; MME asks two "
                                      "per image (lines " + ", ".join(str(s.line) for s in group) + ")", group[0].line)
            if group[0].question == group[1].question:
                raise DataError(path, f"{subtask}/{image}: the same question twice", group[1].line)
            rows.extend(mme.MMEResult(image, s.question or "", s.label, s.answer) for s in group)
        out[subtask] = rows
    return out


def mme_scores(path: str | Path) -> dict[str, Any]:
    """The official MME scores (:func:`mme.mme_scores`: totals only over complete groups) of a samples file."""
    samples = read_samples(path, "mme")
    return {"format": FORMAT, "task": task_name(path), **mme.mme_scores(mme_results(samples, path))}


__all__ = ["FORMAT", "LoggedSample", "is_logged_sample", "is_samples_file", "mme_results", "mme_scores",
           "pope_scores", "read_samples", "task_name"]
