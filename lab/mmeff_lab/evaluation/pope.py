"""POPE: question files, answer files, LLaVA's answer parser and the per-split metrics.

Matches LLaVA's ``llava/eval/eval_pope.py``: the answer's text before the first '.', commas removed,
split on single spaces; "No", "not" or "no" among the words -> "no", otherwise "yes". Metrics take
"yes" as the positive class. The three official COCO question files ship with the package.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import check_image, is_logged_sample, iter_json_lines, require, shipped_path
from .errors import DataError

POPE_SPLITS: dict[str, str] = {
    "pope_random": "coco_pope_random.json",
    "pope_popular": "coco_pope_popular.json",
    "pope_adversarial": "coco_pope_adversarial.json",
}


@dataclass(frozen=True)
class Question:
    question_id: int
    image: str
    text: str
    label: str  # "yes" | "no"
    source: str = field(default="", compare=False, repr=False)
    line: int = field(default=0, compare=False, repr=False)


def load_questions(path: str | Path) -> list[Question]:
    """Read a POPE question file (JSON lines ``{question_id, image, text, label}``)."""
    questions: list[Question] = []
    seen: dict[int, int] = {}
    for lineno, obj in iter_json_lines(path):
        qid = require(path, lineno, obj, "question_id", int)
        label = require(path, lineno, obj, "label", str)
        if label not in ("yes", "no"):
            raise DataError(path, f"label must be 'yes' or 'no', got {label!r}", lineno)
        if qid in seen:
            raise DataError(path, f"question_id {qid} repeats line {seen[qid]}", lineno)
        seen[qid] = lineno
        questions.append(Question(qid, require(path, lineno, obj, "image", str),
                                  require(path, lineno, obj, "text", str), label, str(path), lineno))
    if not questions:
        raise DataError(path, "no questions in file")
    return questions


def load_split(name: str) -> list[Question]:
    """One of the shipped official COCO splits: ``pope_random``, ``pope_popular``, ``pope_adversarial``."""
    if name not in POPE_SPLITS:
        raise DataError(name, f"unknown POPE split; known: {', '.join(POPE_SPLITS)}")
    return load_questions(shipped_path(POPE_SPLITS[name]))


def resolve_images(questions: Sequence[Question], image_dir: str | Path,
                   skip_missing: bool = False) -> tuple[list[Question], list[Path], int]:
    """Pair each question with its image under ``image_dir`` (e.g. COCO val2014).

    Missing or corrupt images are one error naming how many, the first few and the first question's file and
    line; with ``skip_missing`` their questions are dropped and counted instead. Returns (questions kept, image
    paths, n skipped).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(image_dir, "image folder not found")
    status: dict[str, bool] = {}
    kept: list[Question] = []
    paths: list[Path] = []
    skipped = 0
    bad: list[DataError] = []
    for q in questions:
        path = image_dir / q.image
        if q.image not in status:
            try:
                check_image(path, q.source or image_dir, q.line or None)
                status[q.image] = True
            except DataError as e:
                bad.append(e)
                status[q.image] = False
        if status[q.image]:
            kept.append(q)
            paths.append(path)
        else:
            skipped += 1
    if bad and not skip_missing:
        if len(bad) == 1:
            raise bad[0]
        names = ", ".join(Path(e.problem.rsplit(": ", 1)[-1]).name if "not found" in e.problem else e.path
                          for e in bad[:5])
        raise DataError(bad[0].path, f"{len(bad)} images missing or unreadable under {image_dir} (first: {names}; "
                        f"the first: {bad[0].problem})", bad[0].line)
    return kept, paths, skipped


def _first_clause(text: str) -> str:
    """The part of an answer LLaVA's parser reads: the text before the first '.', without commas."""
    return text.split(".")[0].replace(",", "")


def parse_answer(text: str) -> str:
    """LLaVA's POPE parser: "yes" or "no"."""
    words = _first_clause(text).split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def is_yes_or_no(text: str) -> bool:
    """Whether an answer says yes or no at all (in the part :func:`parse_answer` reads). The official rule scores
    any other answer ("maybe", "42", "") as yes; we keep the rule and count them (``non_yes_no``)."""
    words = {w.strip("!?\"'()[]:;").lower() for w in _first_clause(text).split()}
    return bool(words & {"yes", "no", "not"})


ANSWER_FORMATS = {
    "ids": "{question_id, text} lines (LLaVA's model_vqa, mmeff)",
    "positional": "{question, answer} lines in the question file's order (the POPE repository)",
    "lmms-eval": "lmms-eval's logged samples (samples_<task>.jsonl of --log_samples)",
}
LLAVA_ID_BASE = 10_000_000  # LLaVA numbers random 10000001.., popular 20000001.. (adversarial 1..)


def _record_format(obj: dict[str, Any]) -> str | None:
    if is_logged_sample(obj):
        return "lmms-eval"
    if "question_id" in obj:
        return "ids"
    if "answer" in obj:
        return "positional"
    return None


def answer_records(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """(format, JSON lines) of a POPE answer file: one of :data:`ANSWER_FORMATS`, the same on every line — a file
    that mixes them (two runs appended together, a question file passed as answers) is one error."""
    records = list(iter_json_lines(path))
    if not records:
        raise DataError(path, "no answers in file")
    accepted = "; ".join(ANSWER_FORMATS.values())
    first = _record_format(records[0][1])
    if first == "ids" and "label" in records[0][1]:
        raise DataError(path, "a question file (its lines carry labels), not answers: pass it as --questions",
                        records[0][0])
    if first is None:
        raise DataError(path, f"no POPE answer format has the keys {sorted(records[0][1])}; accepted: {accepted}",
                        records[0][0])
    for lineno, obj in records[1:]:
        kind = _record_format(obj)
        if kind != first:
            what = f"a line in the {kind} format" if kind else f"a line with the keys {sorted(obj)}"
            raise DataError(path, f"{what} among {first} lines (line {records[0][0]}): one answer format per file; "
                                  f"accepted: {accepted}", lineno)
    return first, records


def same_question(asked: str, question: str) -> bool:
    """Whether a prompt (LLaVA's ``prompt`` may carry a suffix such as "Answer the question using a single word or
    phrase.") asks ``question``."""
    return " ".join(question.split()) in " ".join(asked.split())


def check_identity(path: str | Path, records: Sequence[tuple[int, dict[str, Any]]],
                   by_id: dict[int, Question], source: str) -> None:
    """Answers that name their question (``prompt`` / ``question``) or image (``image``) must name the one their
    question_id has in ``source``; otherwise they answer another question file (COCO vs synthetic, another split)
    and matching ids would score them against other images' labels. One error counting every mismatch."""
    bad: list[tuple[int, int, str]] = []
    for lineno, obj in records:
        qid = obj.get("question_id")
        q = by_id.get(qid) if isinstance(qid, int) else None
        if q is None:
            continue
        image = obj.get("image")
        asked = obj.get("prompt", obj.get("question"))
        if isinstance(image, str) and Path(image).name != q.image:
            bad.append((lineno, q.question_id,
                        f"is about {image}, question {q.question_id} of {source} about {q.image}"))
        elif isinstance(asked, str) and not same_question(asked, q.text):
            bad.append((lineno, q.question_id, f"asks {' '.join(asked.split())!r}, question {q.question_id} of "
                                               f"{source} asks {q.text!r}"))
    if bad:
        lineno, _, why = bad[0]
        raise DataError(path, f"{len(bad)} of {len(records)} answers are to other questions than those of {source} "
                              f"(first: the answer {why}); pass the questions they answer: --questions FILE, or "
                              "--data with their benchmark (coco, synthetic, a folder)", lineno)


def load_answers(path: str | Path, questions: Sequence[Question], source: str = "the question file") -> list[str]:
    """Raw answer texts, in the order of ``questions``, from JSON lines ``{question_id, text}`` (LLaVA's
    ``model_vqa`` output, mmeff's), or — the POPE repository's own format — ``{question, answer}`` lines in the
    question file's order (each ``question`` must be that line's question). ``source`` names the questions in
    errors.

    Answers for unknown questions (all counted, in one error), a repeated answer, an unanswered question or an
    answer whose ``prompt``/``question``/``image`` is not its question's is an error.
    """
    kind, records = answer_records(path)
    if kind == "lmms-eval":
        raise DataError(path, "lmms-eval's logged samples carry their own questions and labels: score them without "
                              "--questions/--data")
    if kind == "positional":
        return _positional_answers(path, records, questions, source)
    by_id = {q.question_id: q for q in questions}
    texts: dict[int, str] = {}
    unknown: list[tuple[int, int]] = []
    for lineno, obj in records:
        qid = require(path, lineno, obj, "question_id", int)
        text = require(path, lineno, obj, "text", str)
        if qid not in by_id:
            unknown.append((lineno, qid))
            continue
        if qid in texts:
            raise DataError(path, f"second answer for question_id {qid}", lineno)
        texts[qid] = text
    if unknown:
        lineno, qid = unknown[0]
        hint = (" — LLaVA's numbering of its three splits: pass --questions llava_pope_test.jsonl (LLaVA's question "
                "file)" if any(i > LLAVA_ID_BASE for _, i in unknown) else
                " — pass the questions they answer: --questions FILE, or --data with their benchmark")
        raise DataError(path, f"{len(unknown)} of {len(records)} answers are for question ids not among the "
                              f"{len(questions)} questions of {source} (first: question_id {qid}){hint}", lineno)
    check_identity(path, records, by_id, source)
    missing = [q.question_id for q in questions if q.question_id not in texts]
    if missing:
        raise DataError(path, f"{len(missing)} questions have no answer (first ids: {missing[:5]})")
    return [texts[q.question_id] for q in questions]


def _positional_answers(path: str | Path, records: list[tuple[int, dict]], questions: Sequence[Question],
                        source: str = "the question file") -> list[str]:
    if len(records) != len(questions):
        raise DataError(path, f"{len(records)} answers in the POPE repository's format (in question order) for "
                              f"{len(questions)} questions")
    out = []
    for (lineno, obj), q in zip(records, questions):
        asked = obj.get("question")
        if asked is not None and " ".join(str(asked).split()) != " ".join(q.text.split()):
            raise DataError(path, f"answer {lineno} is to {asked!r}, but question {lineno} of {source} is "
                                  f"{q.text!r} (answers must follow the question file's order)", lineno)
        out.append(require(path, lineno, obj, "answer", str))
    return out


def score_llava_answers(answers_path: str | Path, questions_path: str | Path) -> dict[str, dict[str, float]]:
    """Per-split metrics of an answer file of LLaVA's POPE evaluation (``{question_id, text}`` lines; ids 1..3000
    adversarial, 10000001.. random, 20000001.. popular) with its question file (``llava_pope_test.jsonl``:
    ``{question_id, image, text, category}``), the way LLaVA's ``eval_pope.py`` pairs them: per category, the
    answers in file order against the labels of ``coco_pope_<category>.json`` in order (the shipped files). Each
    pair's image must agree, so a misaligned file is an error, not a silent score."""
    asked: dict[int, dict[str, Any]] = {}
    for lineno, obj in iter_json_lines(questions_path):
        qid = require(questions_path, lineno, obj, "question_id", int)
        category = require(questions_path, lineno, obj, "category", str)
        if f"pope_{category}" not in POPE_SPLITS:
            raise DataError(questions_path, f"category {category!r} is not a POPE split", lineno)
        asked[qid] = {"category": category, "image": require(questions_path, lineno, obj, "image", str)}
    by_split: dict[str, list[tuple[int, str, str]]] = {}
    for lineno, obj in iter_json_lines(answers_path):
        qid = require(answers_path, lineno, obj, "question_id", int)
        if qid not in asked:
            raise DataError(answers_path, f"question_id {qid} is not in {questions_path}", lineno)
        by_split.setdefault(f"pope_{asked[qid]['category']}", []).append(
            (lineno, asked[qid]["image"], require(answers_path, lineno, obj, "text", str)))
    if not by_split:
        raise DataError(answers_path, "no answers")
    out: dict[str, dict[str, float]] = {}
    for split in (s for s in POPE_SPLITS if s in by_split):
        labels = load_split(split)
        got = by_split[split]
        if len(got) != len(labels):
            raise DataError(answers_path, f"{len(got)} answers for the {len(labels)} questions of {split}")
        for (lineno, image, _), q in zip(got, labels):
            if image != q.image:
                raise DataError(answers_path, f"answer {lineno} ({split}) is about {image}, but question "
                                              f"{q.line} of the official {split} file is about {q.image}", lineno)
        out[split] = pope_metrics([t for _, _, t in got], [q.label for q in labels])
    return out


def pope_metrics(preds: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1, yes_ratio (fractions) and n, "yes" positive.

    ``preds`` are raw answers or parsed "yes"/"no" (parsing is idempotent). An undefined precision or
    F1 (no "yes" predicted) is 0.0, where the official script would divide by zero.
    """
    preds = list(preds)
    p = np.array([parse_answer(t) == "yes" for t in preds], dtype=bool)
    labels = list(labels)
    bad = [x for x in labels if x not in ("yes", "no")]
    if bad:
        raise ValueError(f"labels must be 'yes'/'no', got {bad[0]!r}")
    y = np.array([x == "yes" for x in labels], dtype=bool)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions")
    tp, fp = int(np.sum(p & y)), int(np.sum(p & ~y))
    tn, fn = int(np.sum(~p & ~y)), int(np.sum(~p & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / p.size, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(p.mean()), "n": p.size, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "non_yes_no": sum(not is_yes_or_no(t) for t in preds)}


def pope_sample_matrix(preds: Iterable[str], labels: Iterable[str]) -> np.ndarray:
    """(n, 2) int array [pred_is_yes, label_is_yes] per question, for ``paired_bootstrap``."""
    p = [parse_answer(t) == "yes" for t in preds]
    y = [x == "yes" for x in labels]
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    return np.column_stack([np.array(p, dtype=np.int64), np.array(y, dtype=np.int64)])
