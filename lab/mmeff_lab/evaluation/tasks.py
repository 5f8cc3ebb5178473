"""The evaluation tasks: which samples a task has, the prompt each gets, and how answers are scored.

Task names: ``pope`` (= the three splits), ``pope_random``, ``pope_popular``, ``pope_adversarial``, ``chair``,
``mme``. Prompts here are the ``mmeff-0`` protocol: POPE = question + :data:`POPE_SUFFIX` (16 new tokens at
most); CHAIR = :data:`CHAIR_PROMPT` (``chair_max_new_tokens``, default 512); MME = the question as is (16).
``mmeff eval`` rebuilds them with the run's prompt protocol (:mod:`.prompt_protocols`) from ``meta["question"]``.

Data (``--data``):
* ``synthetic``: :func:`mmeff_lab.reference.synthetic.ensure_benchmarks` (default sizes), or the path of any
  folder it wrote (recognised by its ``manifest.json``);
* a real-data folder ``PATH`` holding ``val2014/`` (COCO images: POPE with the shipped official question
  files; CHAIR on the 500 POPE images, as the papers do, with the shipped ground truth) and/or
  ``MME_Benchmark_release_version/`` (or ``MME_Benchmark/``), the official MME release; the subtasks present
  are run.

``--limit N`` keeps the first N samples of each task; for MME the first N questions of each subtask, rounded
up to whole images (its metrics pair the two questions of an image).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.errors import MmeffError

from . import bootstrap as bs
from . import chair, mme, pope
from ._io import check_image
from .errors import DataError

POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
CHAIR_PROMPT = "Please describe this image in detail."
SHORT_ANSWER_TOKENS = 16
SYNTHETIC_FORMAT = "mmeff-synthetic-benchmarks"
POPE_TASKS = tuple(pope.POPE_SPLITS)
TASK_NAMES = ("pope", *POPE_TASKS, "chair", "mme")


class UnknownTaskError(MmeffError):
    """A task name that does not exist; the message lists the valid ones."""


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"pope,chair"`` -> ``["pope_random", "pope_popular", "pope_adversarial", "chair"]`` (order kept)."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise UnknownTaskError(f"no task given; valid tasks: {', '.join(TASK_NAMES)}")
    out: list[str] = []
    for name in names:
        if name not in TASK_NAMES:
            raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
        for t in POPE_TASKS if name == "pope" else (name,):
            if t not in out:
                out.append(t)
    return out


@dataclass(frozen=True)
class DataSource:
    """Where the benchmark files are: ``kind`` is ``synthetic`` or ``real``."""

    kind: str
    root: Path

    @property
    def image_dir(self) -> Path:
        return self.root / ("images" if self.kind == "synthetic" else "val2014")

    def pope_file(self, split: str) -> Path | None:
        """The split's question file; None for real data (the shipped official file)."""
        if self.kind == "synthetic":
            return self.root / "pope" / f"coco_pope_{split.removeprefix('pope_')}.json"
        return None

    def mme_root(self) -> Path:
        if self.kind == "synthetic":
            return self.root / "mme" / "MME_Benchmark"
        # the release zip unpacks to MME_Benchmark_release_version/MME_Benchmark/<subtask>; older copies and
        # hand-made folders hold the subtasks one level up, or --data is the release folder itself
        for cand in (self.root / "MME_Benchmark_release_version" / "MME_Benchmark",
                     self.root / "MME_Benchmark_release_version", self.root / "MME_Benchmark",
                     self.root / "MME_Benchmark" / "MME_Benchmark", self.root):
            if cand.is_dir() and any((cand / s).is_dir() for s in mme.SUBTASKS):
                return cand
        raise DataError(self.root, "no MME subtask folders under MME_Benchmark_release_version/MME_Benchmark/, "
                        "MME_Benchmark_release_version/ or MME_Benchmark/ for the mme task")

    @property
    def mme_benchmark(self) -> tuple[str, ...]:
        """The MME subtasks this benchmark consists of (totals need all of a group's)."""
        from mmeff_lab.reference.synthetic import MME_SUBTASKS

        return tuple(MME_SUBTASKS) if self.kind == "synthetic" else tuple(mme.SUBTASKS)

    @cached_property
    def chair_ground_truth(self) -> dict[int, frozenset[str]]:
        if self.kind == "synthetic":
            return load_plain_ground_truth(self.root / "chair" / "synth_image_objects.json")
        return chair.load_ground_truth()

    def describe(self) -> str:
        return f"{self.kind}:{self.root}"


def load_plain_ground_truth(path: str | Path) -> dict[int, frozenset[str]]:
    """CHAIR ground truth as a plain JSON object ``{image_id: [node words]}`` (the synthetic sets' file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(path, f"not a readable JSON file ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(path, "expected a JSON object mapping image ids to lists of object words")
    try:
        return {int(k): frozenset(v) for k, v in data.items()}
    except ValueError as e:
        raise DataError(path, f"an image id is not an integer ({e})") from e


def resolve_data(data: str | Path) -> DataSource:
    """``synthetic`` (generated on first use), a synthetic benchmark folder, or a real-data folder."""
    if str(data) == "synthetic":
        from mmeff_lab.reference.synthetic import ensure_benchmarks

        return DataSource("synthetic", ensure_benchmarks())
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(root, "data folder not found (expected 'synthetic' or a folder; see docs/evaluation.md)")
    manifest = root / "manifest.json"
    if manifest.is_file():
        from mmeff_lab.reference.synthetic import verify_benchmarks

        try:
            fmt = json.loads(manifest.read_text()).get("format")
        except ValueError as e:
            raise DataError(manifest, f"unreadable manifest ({e})") from e
        if fmt == SYNTHETIC_FORMAT:
            verify_benchmarks(root)
            return DataSource("synthetic", root)
    return DataSource("real", root)


@dataclass(frozen=True)
class Sample:
    task: str
    id: str  # unique within the task; the key of the sample log
    image: Path
    prompt: str
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# -- loading ---------------------------------------------------------------------------------------------------
def _pope_samples(split: str, data: DataSource, limit: int | None) -> list[Sample]:
    path = data.pope_file(split)
    questions = pope.load_questions(path) if path is not None else pope.load_split(split)
    questions = questions[:limit] if limit is not None else questions
    kept, paths, _ = pope.resolve_images(questions, data.image_dir)
    return [Sample(split, str(q.question_id), p, q.text + POPE_SUFFIX, SHORT_ANSWER_TOKENS,
                   {"label": q.label, "question_id": q.question_id, "question": q.text})
            for q, p in zip(kept, paths)]


def _chair_images(data: DataSource) -> list[tuple[int, str]]:
    if data.kind == "synthetic":
        from mmeff_lab.reference.synthetic import image_name

        return [(i, image_name(i)) for i in data.chair_ground_truth]
    seen: dict[str, int] = {}
    for q in pope.load_split("pope_random"):  # the 500 POPE images, in order of first appearance
        if q.image not in seen:
            seen[q.image] = chair._image_id(q.image, "coco_pope_random.json", q.line)
    return [(i, name) for name, i in seen.items()]


def _chair_samples(data: DataSource, limit: int | None, max_new_tokens: int) -> list[Sample]:
    images = _chair_images(data)
    images = images[:limit] if limit is not None else images
    out = []
    for image_id, name in images:
        path = data.image_dir / name
        check_image(path, data.image_dir)
        out.append(Sample("chair", str(image_id), path, CHAIR_PROMPT, max_new_tokens, {"image_id": image_id}))
    return out


def _mme_samples(data: DataSource, limit: int | None) -> list[Sample]:
    root = data.mme_root()
    subtasks = [s for s in mme.SUBTASKS if (root / s).is_dir()]
    if not subtasks:
        raise DataError(root, f"no MME subtask folder ({', '.join(mme.SUBTASKS)})")
    out = []
    for s in subtasks:
        questions, _ = mme.load_subtask(root / s, s)
        if limit is not None:
            questions = questions[: 2 * math.ceil(limit / 2)]
        for k, q in enumerate(questions):
            assert q.image_path is not None
            out.append(Sample("mme", f"{s}/{q.image}#{k % 2}", q.image_path, q.question, SHORT_ANSWER_TOKENS,
                              {"subtask": s, "image": q.image, "question": q.question, "answer": q.answer}))
    return out


def load_samples(task: str, data: DataSource, limit: int | None = None, chair_max_new_tokens: int = 512
                 ) -> list[Sample]:
    if limit is not None and limit < 1:
        raise MmeffError(f"--limit must be >= 1, got {limit}")
    if task in POPE_TASKS:
        return _pope_samples(task, data, limit)
    if task == "chair":
        return _chair_samples(data, limit, chair_max_new_tokens)
    if task == "mme":
        return _mme_samples(data, limit)
    raise UnknownTaskError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")


# -- scoring ---------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    metrics: dict[str, Any]
    matrix: np.ndarray  # per-sample rows for the paired bootstrap
    details: Any = None  # CHAIR: the per-caption sentences (official keys)


def recall_metric(x: np.ndarray) -> np.ndarray:
    """CHAIR recall from ``ChairResult.sample_matrix()`` rows: recalled GT objects / GT objects."""
    r, g = x[..., 3].sum(axis=1), x[..., 4].sum(axis=1)
    return np.where(g > 0, r / np.maximum(g, 1), 0.0)


def perception_metric(x: np.ndarray) -> np.ndarray:
    """MME perception total: the official sum over subtasks, on the perception rows only (others weigh 0)."""
    perception = x[..., 2:3] < len(mme.PERCEPTION)
    return bs.mme_total_metric(np.where(perception, x, np.array([0.0, 0.0, len(mme.SUBTASKS)])),
                               n_subtasks=len(mme.SUBTASKS) + 1)


def clip_s_metric(x: np.ndarray) -> np.ndarray:
    """Mean CLIP-S: the last column of the CHAIR rows once :func:`add_clip_s` appended it."""
    return x[..., -1].mean(axis=1)


def add_clip_s(scored: Scored, clip_scores: Sequence[float]) -> Scored:
    """CHAIR scores plus CLIPScore (``--clipscore``): metric ``clip_s`` (mean per-caption CLIP-S) and the
    per-caption scores as the last column of the bootstrap rows, so its CI pairs the same resamples."""
    clip = np.asarray(clip_scores, dtype=np.float64)
    if clip.shape != (len(scored.matrix),):
        raise ValueError(f"{len(clip)} CLIP-S values for {len(scored.matrix)} captions")
    return Scored({**scored.metrics, "clip_s": float(clip.mean()) if len(clip) else 0.0},
                  np.column_stack([scored.matrix, clip]), scored.details)


# headline metrics that get a paired-bootstrap delta: name -> per-resample statistic (a metric absent from the
# scores, as clip_s without --clipscore, gets none)
HEADLINE: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] = {
    **{t: {"f1": bs.pope_f1_metric, "accuracy": bs.pope_accuracy_metric} for t in POPE_TASKS},
    "chair": {"chair_s": bs.chair_s_metric, "chair_i": bs.chair_i_metric, "recall": recall_metric,
              "clip_s": clip_s_metric},
    "mme": {"perception": perception_metric},
}


def score(task: str, samples: Sequence[Sample], answers: Sequence[str],
          ground_truth: dict[int, frozenset[str]] | None = None,
          mme_benchmark: Sequence[str] = mme.SUBTASKS, chair_protocol: str = chair.DEFAULT_PROTOCOL) -> Scored:
    """Official metrics of ``answers`` (one per sample, same order); CHAIR's words by ``chair_protocol``."""
    if len(samples) != len(answers):
        raise ValueError(f"{task}: {len(answers)} answers for {len(samples)} samples")
    if task in POPE_TASKS:
        labels = [s.meta["label"] for s in samples]
        m = pope.pope_metrics(answers, labels)
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "non_yes_no")
        return Scored({k: m[k] for k in keys}, pope.pope_sample_matrix(answers, labels))
    if task == "chair":
        res = chair.evaluate_chair([(s.meta["image_id"], a) for s, a in zip(samples, answers)], ground_truth,
                                   protocol=chair_protocol)
        return Scored(chair_metrics(res.metrics), res.sample_matrix(), res.sentences)
    if task == "mme":
        results: dict[str, list[mme.MMEResult]] = {}
        for s, a in zip(samples, answers):
            results.setdefault(s.meta["subtask"], []).append(
                mme.MMEResult(s.meta["image"], s.meta["question"], s.meta["answer"], a))
        return Scored(mme_metrics(mme.mme_scores(results, mme_benchmark)), mme.mme_sample_matrix(results))
    raise UnknownTaskError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")


def chair_metrics(m: dict[str, float]) -> dict[str, Any]:
    return {"chair_s": m["CHAIRs"], "chair_i": m["CHAIRi"], "recall": m["Recall"], "len": m["Len"], "n": m["n"]}


def mme_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {"perception": m["perception"], "cognition": m["cognition"], "subtasks": m["subtasks"],
            "totals_missing": m["totals_missing"],
            "n": sum(v["n_questions"] for v in m["subtasks"].values()),
            "unparsed": sum(v["n_other"] for v in m["subtasks"].values())}


__all__ = ["CHAIR_PROMPT", "HEADLINE", "POPE_SUFFIX", "POPE_TASKS", "TASK_NAMES", "DataSource", "Sample", "Scored",
           "UnknownTaskError", "load_samples", "parse_tasks", "resolve_data", "score"]
