"""MME: the official benchmark folders, result files, and the metrics of the official ``calculation.py``.

Layout (``MME_Benchmark_release_version``): ``<root>/<subtask>/`` holds either ``images/`` plus
``questions_answers_YN/`` or, flat, the images and their ``<stem>.txt`` side by side; each txt has two
``question<TAB>answer`` lines (answer Yes/No). The eval tool's ``<subtask>.txt`` template of
``image<TAB>question<TAB>answer`` lines is read too. Results: per subtask a txt of
``image<TAB>question<TAB>answer<TAB>prediction`` lines, two consecutive lines per image.

Parser (official): the lower-cased prediction is "yes"/"no" if exactly that, else the first four
characters decide ("yes" in them -> yes, else "no" in them -> no, else "other", which is wrong).
Per subtask: acc = correct / questions, acc+ = images with both right / images,
score = 100·acc + 100·acc+. Perception = sum of the 10 perception scores, cognition of the 4 others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmeff.io import atomic_write_text

from ._io import check_image, read_text
from .errors import DataError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # file name, as the result files name it
    question: str
    answer: str  # "yes" | "no"
    image_path: Path | None = None


def _answer(raw: str, path: Path, lineno: int) -> str:
    ans = raw.strip().lower()
    if ans not in ("yes", "no"):
        raise DataError(path, f"answer must be Yes or No, got {raw!r}", lineno)
    return ans


def _split_line(line: str, n: int, path: Path, lineno: int, what: str) -> list[str]:
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != n:
        raise DataError(path, f"expected {what} ({n} tab-separated fields), got {len(parts)}: {line!r}", lineno)
    return parts


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _read_qa_file(txt: Path, subtask: str, image: Path) -> list[MMEQuestion]:
    lines = [(i, ln) for i, ln in enumerate(read_text(txt).splitlines(), 1) if ln.strip()]
    if len(lines) != 2:
        raise DataError(txt, f"expected 2 question lines per image, found {len(lines)}")
    out = []
    for lineno, line in lines:
        question, answer = _split_line(line, 2, txt, lineno, "question<TAB>answer")
        out.append(MMEQuestion(subtask, image.name, question, _answer(answer, txt, lineno), image))
    return out


def load_subtask(folder: str | Path, subtask: str | None = None,
                 skip_missing: bool = False) -> tuple[list[MMEQuestion], int]:
    """One official subtask folder (split or flat layout). Returns (questions, images skipped)."""
    folder = Path(folder)
    subtask = subtask or folder.name
    if not folder.is_dir():
        raise DataError(folder, "MME subtask folder not found")
    if (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir():
        qa_dir, img_dir = folder / "questions_answers_YN", folder / "images"
    else:
        qa_dir = img_dir = folder
    txts = sorted(qa_dir.glob("*.txt"))
    if not txts:
        raise DataError(qa_dir, "no question files (*.txt)")
    questions: list[MMEQuestion] = []
    skipped = 0
    for txt in txts:
        image = _find_image(img_dir, txt.stem)
        try:
            if image is None:
                raise DataError(txt, f"no image {txt.stem}.jpg/.png in {img_dir}")
            check_image(image, txt)
        except DataError:
            if not skip_missing:
                raise
            skipped += 1
            continue
        questions.extend(_read_qa_file(txt, subtask, image))
    return questions, skipped


def load_mme(root: str | Path, subtasks: Sequence[str] = SUBTASKS,
             skip_missing: bool = False) -> tuple[list[MMEQuestion], int]:
    """All requested subtasks under the release root. Returns (questions, images skipped)."""
    root = Path(root)
    out: list[MMEQuestion] = []
    skipped = 0
    for name in subtasks:
        qs, n = load_subtask(root / name, name, skip_missing)
        out.extend(qs)
        skipped += n
    return out, skipped


def load_template(path: str | Path, subtask: str | None = None) -> list[MMEQuestion]:
    """The eval tool's ``<subtask>.txt``: ``image<TAB>question<TAB>answer`` lines (no image check)."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        image, question, answer = _split_line(line, 3, path, lineno, "image<TAB>question<TAB>answer")
        out.append(MMEQuestion(subtask or path.stem, image, question, _answer(answer, path, lineno)))
    return out


def parse_prediction(pred: str) -> str:
    """Official parser: "yes", "no" or "other"."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@dataclass(frozen=True)
class MMEResult:
    image: str
    question: str
    answer: str
    prediction: str


def write_results(path: str | Path, questions: Sequence[MMEQuestion], predictions: Sequence[str]) -> None:
    """Write one subtask's result file (atomically); tabs/newlines in predictions become spaces."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    path = Path(path)
    lines = []
    for q, p in zip(questions, predictions):
        p = " ".join(p.replace("\t", " ").splitlines())
        lines.append(f"{q.image}\t{q.question}\t{'Yes' if q.answer == 'yes' else 'No'}\t{p}\n")
    atomic_write_text(path, "".join(lines))


def load_results(path: str | Path) -> list[MMEResult]:
    """One subtask result file; lines must come in pairs about the same image."""
    path = Path(path)
    rows: list[tuple[int, MMEResult]] = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        image, question, answer, pred = _split_line(line, 4, path, lineno,
                                                    "image<TAB>question<TAB>answer<TAB>prediction")
        rows.append((lineno, MMEResult(image, question, _answer(answer, path, lineno), pred)))
    if not rows or len(rows) % 2:
        raise DataError(path, f"{len(rows)} result lines: need two per image")
    for (l1, a), (_, b) in zip(rows[::2], rows[1::2]):
        if a.image != b.image:
            raise DataError(path, f"lines {l1}-{l1 + 1} pair different images {a.image!r} / {b.image!r}", l1)
    return [r for _, r in rows]


def load_results_dir(results_dir: str | Path, subtasks: Sequence[str] = SUBTASKS) -> dict[str, list[MMEResult]]:
    """``<results_dir>/<subtask>.txt`` for every subtask present (at least one must be)."""
    results_dir = Path(results_dir)
    out = {s: load_results(results_dir / f"{s}.txt") for s in subtasks if (results_dir / f"{s}.txt").is_file()}
    if not out:
        raise DataError(results_dir, f"no result files named <subtask>.txt (subtasks: {', '.join(subtasks)})")
    return out


def subtask_metrics(results: Sequence[MMEResult]) -> dict[str, float]:
    correct = np.array([parse_prediction(r.prediction) == r.answer for r in results]).reshape(-1, 2)
    acc = float(correct.mean())
    acc_plus = float(correct.all(axis=1).mean())
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
            "n_questions": correct.size, "n_images": correct.shape[0],
            "n_other": sum(parse_prediction(r.prediction) == "other" for r in results)}


def mme_scores(results: Mapping[str, Sequence[MMEResult]],
               benchmark: Sequence[str] = SUBTASKS) -> dict[str, object]:
    """Per-subtask metrics plus the perception / cognition totals — each only over its *complete* group of the
    ``benchmark``'s subtasks (the official release: all 10 / all 4; a synthetic benchmark: its own set). An
    incomplete group's total is None, never a sum over what happened to be there; ``totals_missing`` says why."""
    unknown = set(results) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown MME subtasks {sorted(unknown)}; known: {', '.join(SUBTASKS)}")
    per = {s: subtask_metrics(results[s]) for s in SUBTASKS if s in results}
    out: dict[str, object] = {"subtasks": per, "benchmark_subtasks": list(benchmark),
                              "missing_subtasks": [s for s in benchmark if s not in per]}
    why: dict[str, str] = {}
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        wanted = [s for s in group if s in benchmark]
        absent = [s for s in wanted if s not in per]
        if not wanted:
            out[name] = None
            why[name] = "not part of this benchmark"
        elif absent:
            out[name] = None
            why[name] = f"{len(absent)} of its {len(wanted)} subtasks missing ({', '.join(absent)})"
        else:
            out[name] = sum(per[s]["score"] for s in wanted)
    out["totals_missing"] = why
    return out


def mme_sample_matrix(results: Mapping[str, Sequence[MMEResult]]) -> np.ndarray:
    """(n_images, 3) rows [q1 correct, q2 correct, subtask index in SUBTASKS], for ``paired_bootstrap``."""
    rows = []
    for s, res in results.items():
        correct = np.array([parse_prediction(r.prediction) == r.answer for r in res]).reshape(-1, 2)
        rows.append(np.column_stack([correct.astype(np.float64), np.full(len(correct), SUBTASKS.index(s))]))
    return np.concatenate(rows)


def questions_by_subtask(questions: Iterable[MMEQuestion]) -> dict[str, list[MMEQuestion]]:
    out: dict[str, list[MMEQuestion]] = {}
    for q in questions:
        out.setdefault(q.subtask, []).append(q)
    return out
