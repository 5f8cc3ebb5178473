"""``mmeff score pope|chair|mme``: the official metrics on answers produced by any model or server.

Inputs are the official scripts' formats:
* POPE: answers as JSON lines ``{question_id, text}`` (LLaVA, mmeff) or ``{question, answer}`` in question order
  (the POPE repository), matched to a question file (``--questions`` = a file, LLaVA's ``llava_pope_test.jsonl``,
  or a split name ``random|popular|adversarial``, default ``random``, of ``--data``'s benchmark); or lmms-eval's
  logged samples, which carry their questions and labels;
* CHAIR: captions as a JSON list or JSON lines ``{image_id, caption}``; ground truth (``--annotations``) =
  a ``{image_id: [objects]}`` JSON (``.json`` or ``.json.gz``) or a folder with COCO ``instances_*.json`` and
  ``captions_*.json`` (built the official way with ``--protocol``'s words), default from ``--data``;
  ``--protocol original|opera|wordnet`` (default original: the standalone script's words); ``--images pope|FILE``
  scores only the captions of that image set (default: every caption);
* MME: a folder of per-subtask result files ``<subtask>.txt`` (or one such file) with
  ``image<TAB>question<TAB>answer<TAB>prediction`` lines, or lmms-eval's ``samples_mme.jsonl``.

``--data``: ``auto`` (default: the benchmark the predictions name — POPE by the images or questions the answers
quote, CHAIR by the image ids; POPE ids alone fit COCO and the synthetic set alike and are refused, naming the
flag), ``coco`` (the shipped official POPE questions and CHAIR ground truth of COCO 2014), ``synthetic`` or a
benchmark folder. Predictions that are not all in the chosen ground truth are one error counting them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mmeff.errors import MmeffError

BENCHMARKS = ("pope", "chair", "mme")
POPE_SPLIT_NAMES = ("random", "popular", "adversarial")


def _data(data: str) -> Any:
    from mmeff_lab.evaluation.tasks import DataSource, resolve_data

    if data == "coco":
        return DataSource("real", Path("."))  # only the shipped question / ground-truth files are read
    return resolve_data(data)


def _image_kind(name: str) -> str:
    """``coco`` / ``synthetic`` / ``other`` for an image file name."""
    name = Path(name).name
    return "coco" if name.startswith("COCO_") else "synthetic" if name.startswith("synth_") else "other"


def _split_questions(source: Any, split: str) -> tuple[list[Any], str]:
    """(the split's questions, how errors name them) of a benchmark."""
    from mmeff_lab.evaluation import pope

    path = source.pope_file(split)
    if path is None:
        return pope.load_split(split), f"the shipped COCO {split} file"
    return pope.load_questions(path), str(path)


def _texts_match(kind: str, records: list[tuple[int, dict[str, Any]]], questions: list[Any]) -> bool:
    """Whether every answer that quotes its question (``prompt`` / ``question``) quotes the one it is matched to:
    by question_id (``ids``) or by position (``positional``)."""
    from mmeff_lab.evaluation import pope

    by_id = {q.question_id: q for q in questions}
    for k, (_, obj) in enumerate(records):
        asked = obj.get("prompt", obj.get("question"))
        if not isinstance(asked, str):
            continue
        q = by_id.get(obj.get("question_id")) if kind == "ids" else questions[k] if k < len(questions) else None
        if q is None or not pope.same_question(asked, q.text):
            return False
    return True


def _infer_pope_benchmark(predictions: Path, kind: str, records: list[tuple[int, dict[str, Any]]],
                          split: str) -> Any:
    """The benchmark of answers scored without ``--data``: the images they name, else the questions they quote
    (the shipped COCO files first; the synthetic benchmark is generated only when those say it is not COCO). Ids
    alone do not decide: 1..3000 number the questions of the COCO files and of the synthetic benchmark alike."""
    from mmeff_lab.evaluation import pope

    images = {Path(obj["image"]).name for _, obj in records if isinstance(obj.get("image"), str)}
    if images:
        kinds = {_image_kind(name) for name in images}
        if kinds == {"coco"}:
            return _data("coco")
        if kinds == {"synthetic"}:
            return _data("synthetic")
        example = next(name for name in sorted(images) if _image_kind(name) == "other" or len(kinds) > 1)
        raise MmeffError(f"{predictions}: the answers name images that are not all COCO val2014 or all synthetic "
                         f"(e.g. {example}): pass the question file they answer with --questions FILE")
    coco = _data("coco")
    if kind == "ids":
        known = {q.question_id for q in pope.load_split(split)}
        if any(obj.get("question_id") not in known for _, obj in records):
            return coco  # load_answers counts the unknown ids in its error (and names LLaVA's numbering)
    quoted = any(isinstance(obj.get("prompt", obj.get("question")), str) for _, obj in records)
    if not quoted:
        raise MmeffError(f"{predictions}: the answers carry only question ids (or only their order), which number the "
                         "questions of the COCO POPE files and of the synthetic benchmark alike: pass --data coco "
                         "for answers about COCO val2014 images, --data synthetic (or the benchmark's folder) for the "
                         "synthetic benchmark, or --questions FILE")
    if _texts_match(kind, records, pope.load_split(split)):
        return coco
    synthetic = _data("synthetic")
    if _texts_match(kind, records, _split_questions(synthetic, split)[0]):
        return synthetic
    raise MmeffError(f"{predictions}: the questions the answers quote are neither those of the COCO {split} file nor "
                     f"the synthetic benchmark's: pass the question file they answer with --questions FILE")


def score_pope(predictions: Path, questions: str | None, data: str) -> dict[str, Any]:
    from mmeff_lab.evaluation import lmms_samples, pope

    kind, records = pope.answer_records(predictions)
    if kind == "lmms-eval":
        if questions is not None or data != "auto":
            raise MmeffError(f"{predictions} holds lmms-eval's logged samples, which carry their own questions and "
                             "labels: drop --questions / --data")
        return lmms_samples.pope_scores(predictions)
    questions = questions or "random"
    if questions not in POPE_SPLIT_NAMES:
        if data != "auto":
            raise MmeffError("--data picks the benchmark of a split name (--questions random|popular|adversarial); "
                             f"--questions {questions} is a question file: drop --data")
        if _is_llava_question_file(Path(questions)):
            return {"splits": pope.score_llava_answers(predictions, questions)}
        qs = pope.load_questions(questions)
        return pope.pope_metrics(pope.load_answers(predictions, qs, questions), [q.label for q in qs])
    split = f"pope_{questions}"
    source = _data(data) if data != "auto" else _infer_pope_benchmark(predictions, kind, records, split)
    qs, name = _split_questions(source, split)
    answers = pope.load_answers(predictions, qs, name)
    return pope.pope_metrics(answers, [q.label for q in qs])


def _is_llava_question_file(path: Path) -> bool:
    """LLaVA's ``llava_pope_test.jsonl`` carries each question's split as ``category`` (no label)."""
    from mmeff_lab.evaluation._io import iter_json_lines

    first = next(iter(iter_json_lines(path)), None)
    return first is not None and "category" in first[1] and "label" not in first[1]


def _is_synthetic_id(image_id: int) -> bool:
    from mmeff_lab.reference.synthetic import HELDOUT_SEED_BASE

    return image_id >= HELDOUT_SEED_BASE  # synthetic image ids are scene seeds >= 1e9; COCO's are < 600,000


def _ground_truth(annotations: Path | None, data: str, ids: list[int],
                  protocol: str = "original") -> tuple[dict[int, frozenset[str]], str]:
    """(CHAIR ground truth, its name for errors): ``--annotations``, ``--data``, or with ``--data auto`` the
    benchmark the image ids are of — COCO ids (< 1e9) the shipped COCO 2014 sets, synthetic ids (scene seeds
    >= 1e9) the default synthetic benchmark; a file mixing both is an error."""
    from mmeff_lab.evaluation import chair
    from mmeff_lab.evaluation.errors import DataError
    from mmeff_lab.evaluation.tasks import load_plain_ground_truth

    if annotations is None:
        if data == "auto":
            synthetic = [i for i in ids if _is_synthetic_id(i)]
            if synthetic and len(synthetic) < len(ids):
                coco = next(i for i in ids if not _is_synthetic_id(i))
                raise MmeffError(f"the captions mix COCO image ids (e.g. {coco}) and synthetic-benchmark ones (e.g. "
                                 f"{synthetic[0]}): score each benchmark's captions on their own")
            data = "synthetic" if synthetic else "coco"
        source = _data(data)
        name = ("the shipped COCO 2014 ground truth" if source.kind == "real"
                else f"the synthetic benchmark {source.root}")
        return source.chair_ground_truth, name
    name = f"--annotations {annotations}"
    if annotations.is_dir():
        instances = sorted(annotations.glob("instances_*.json"))
        captions = sorted(annotations.glob("captions_*.json"))
        if not instances or not captions:
            raise DataError(annotations, "need instances_*.json and captions_*.json (COCO annotation files)")
        return chair.ground_truth_from_coco(instances, captions, protocol=protocol), name
    if annotations.name.endswith(".gz"):
        return chair.load_ground_truth(annotations), name
    return load_plain_ground_truth(annotations), name


def _check_covered(predictions: Path, ids: list[int], ground_truth: dict[int, frozenset[str]], name: str) -> None:
    """Every caption's image must be in the ground truth: one error counting the others, with the flag that
    picks their benchmark (never a score against other images' objects)."""
    from mmeff_lab.evaluation.errors import DataError

    unique = list(dict.fromkeys(ids))
    missing = [i for i in unique if i not in ground_truth]
    if not missing:
        return
    hint = ""
    if all(_is_synthetic_id(i) for i in missing) and not any(_is_synthetic_id(i) for i in ground_truth):
        hint = " — they are synthetic-benchmark image ids: pass --data synthetic (or the benchmark's folder)"
    elif not any(_is_synthetic_id(i) for i in missing) and all(_is_synthetic_id(i) for i in ground_truth):
        hint = " — they are COCO image ids: pass --data coco (or --annotations)"
    raise DataError(predictions, f"{len(missing)} of the {len(unique)} captioned images have no ground truth in "
                                 f"{name} (first: image id {missing[0]}){hint}")


def score_chair(predictions: Path, annotations: Path | None, data: str, protocol: str = "original",
                images: str | None = None) -> dict[str, Any]:
    """The official output document ``{"overall_metrics": {...}, "sentences": [...]}`` plus the protocol and the
    image set it was computed with."""
    from mmeff_lab.evaluation import chair
    from mmeff_lab.evaluation.errors import DataError

    normalise = chair.normaliser(protocol)  # an unknown or unavailable protocol fails before any reading
    captions = chair.load_captions(predictions)
    image_set: dict[str, Any] = {"name": "all", "n_images": len({i for i, _ in captions})}
    if images is not None:
        name, ids = chair.image_set(images)
        wanted = set(ids)
        kept = [c for c in captions if c[0] in wanted]
        if not kept:
            raise DataError(predictions, f"no caption of an image in the CHAIR image set {name!r}")
        image_set = {"name": name, "n_images": len(ids), "n_captions_outside": len(captions) - len(kept),
                     "n_images_without_caption": len(wanted - {i for i, _ in kept})}
        captions = kept
    ids = [i for i, _ in captions]
    ground_truth, name = _ground_truth(annotations, data, ids, protocol)
    _check_covered(predictions, ids, ground_truth, name)
    result = chair.evaluate_chair(captions, ground_truth, protocol=normalise)
    return {"protocol": protocol, "image_set": image_set, "overall_metrics": result.metrics,
            "sentences": result.sentences}


def _caption_images(data: str, image_dir: Path | None) -> Any:
    """image id -> image path for CLIP-S: ``--image-dir`` (COCO ``COCO_val2014_*.jpg`` or synthetic ``synth_*.jpg``
    names), else the images of a ``--data`` benchmark folder (or ``synthetic``); the shipped COCO files hold no
    images, so ``--data auto``/``coco`` need ``--image-dir``."""
    from mmeff_lab.reference.synthetic import image_name

    if image_dir is None:
        if data in ("auto", "coco"):
            raise MmeffError("--clipscore needs the images the captions describe: pass --image-dir (a folder of "
                             "COCO_val2014_*.jpg or synthetic images) or --data with the benchmark folder")
        image_dir = _data(data).image_dir
    if not image_dir.is_dir():
        raise MmeffError(f"--clipscore: image folder {image_dir} not found")

    def path(image_id: int) -> Path:
        coco = image_dir / f"COCO_val2014_{image_id:012d}.jpg"
        return coco if coco.is_file() else image_dir / image_name(image_id)

    return path


def add_clipscore(scores: dict[str, Any], scorer: Any, path: Callable[[int], Path]) -> None:
    """CLIP-S of each scored caption (``sentences[i]["clip_s"]``; ``path``: image id -> image file), their mean
    as ``overall_metrics["CLIPScore"]`` and the model as ``scores["clipscore"]``."""
    images = [path(s["image_id"]) for s in scores["sentences"]]
    missing = sorted({str(p) for p in images if not p.is_file()})
    if missing:
        raise MmeffError(f"--clipscore: {len(missing)} caption image(s) not found (first: {', '.join(missing[:3])})")
    values = scorer.score(images, [s["caption"] for s in scores["sentences"]])
    for sentence, value in zip(scores["sentences"], values):
        sentence["clip_s"] = value
    scores["overall_metrics"]["CLIPScore"] = float(sum(values) / len(values))
    scores["clipscore"] = scorer.describe()


def score_mme(predictions: Path) -> dict[str, Any]:
    """Result files (a folder of ``<subtask>.txt`` or one) or lmms-eval's logged samples (``samples_mme.jsonl``).
    Result files about synthetic images (``synth_*``) are totalled over the synthetic benchmark's subtasks, as
    ``mmeff eval`` does; official image names over the release's 14."""
    from mmeff_lab.evaluation import lmms_samples, mme
    from mmeff_lab.reference.synthetic import MME_SUBTASKS

    if predictions.is_file() and lmms_samples.is_samples_file(predictions):
        return lmms_samples.mme_scores(predictions)
    if predictions.is_dir():
        results = mme.load_results_dir(predictions)
    else:
        if predictions.stem not in mme.SUBTASKS:
            raise MmeffError(f"{predictions}: MME predictions are lmms-eval's logged samples (samples_mme.jsonl) or "
                             "result files named <subtask>.txt with subtask one of "
                             f"{', '.join(mme.SUBTASKS)}")
        results = {predictions.stem: mme.load_results(predictions)}
    kinds = {s: {_image_kind(r.image) for r in rows} for s, rows in results.items()}
    synthetic = {s for s, k in kinds.items() if "synthetic" in k}
    if synthetic and (len(synthetic) < len(results) or any(len(k) > 1 for k in kinds.values())):
        raise MmeffError(f"{predictions}: the results mix synthetic-benchmark images (synth_*) and others: score "
                         "each benchmark's results on their own")
    benchmark = tuple(MME_SUBTASKS) if synthetic else mme.SUBTASKS
    return {"benchmark": "synthetic" if synthetic else "MME", **mme.mme_scores(results, benchmark)}


def _show(benchmark: str, scores: dict[str, Any]) -> None:
    of = scores.get("split") or ("synthetic benchmark" if scores.get("benchmark") == "synthetic" else None)
    table = Table("metric", "value", title=f"{benchmark} scores" + (f" ({of})" if of else ""))
    if benchmark == "pope" and "splits" in scores:  # LLaVA's answer file: one block per split, as eval_pope.py
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "non_yes_no")
        rows = {f"{split} {k}": m[k] for split, m in scores["splits"].items() for k in keys}
    elif benchmark == "pope":
        rows = {k: scores[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "non_yes_no")}
    elif benchmark == "chair":
        rows = {"protocol": scores["protocol"], "image set": scores["image_set"]["name"], **scores["overall_metrics"]}
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
    if scores.get("format") == "lmms-eval samples":
        Console(stderr=True).print(f"note: lmms-eval samples of task {scores['task'] or '?'}: labels as logged, "
                                   "answers read by the official parser (not lmms-eval's own aggregation)",
                                   highlight=False)
    if benchmark == "pope" and scores.get("non_yes_no"):
        Console(stderr=True).print(f"note: {scores['non_yes_no']} of {scores['n']} answers say neither yes nor no; "
                                   "the official rule scores them as yes", highlight=False)


def score_command(
    benchmark: str = typer.Argument(..., help="pope, chair or mme"),
    predictions: Path = typer.Option(..., "--predictions", help="Answers / captions file (MME: folder or file); "
                                     "POPE and MME also lmms-eval's logged samples (samples_<task>.jsonl)."),
    questions: str | None = typer.Option(None, "--questions", help="POPE: random|popular|adversarial (default "
                                         "random), a question file, or LLaVA's llava_pope_test.jsonl (per-split "
                                         "metrics). Not with lmms-eval samples, which carry their questions."),
    annotations: Path | None = typer.Option(None, "--annotations", help="CHAIR ground truth (file or COCO folder)."),
    protocol: str = typer.Option("original", "--protocol", help="CHAIR words: original (the standalone CHAIR "
                                 "script), opera (OPERA's chair.py) or wordnet (noun lemmas)."),
    images: str | None = typer.Option(None, "--images", help="CHAIR: score only the captions of pope (the 500 "
                                      "POPE images) or of the image ids in FILE (default: every caption)."),
    data: str = typer.Option("auto", "--data", help="auto (the benchmark the predictions' images, quoted questions "
                             "or CHAIR image ids are of; ids alone that fit both are refused), coco, synthetic or a "
                             "benchmark folder."),
    output: Path | None = typer.Option(None, "--output", help="Write DIR/<benchmark>_scores.json."),
    clipscore: str | None = typer.Option(None, "--clipscore", help="CHAIR: also CLIPScore with an open_clip "
                                         "model MODEL:PRETRAINED (checkpoint file or tag); needs the images."),
    image_dir: Path | None = typer.Option(None, "--image-dir", help="CHAIR --clipscore: the images (default: "
                                          "those of --data's benchmark folder)."),
) -> None:
    """Score answers with the official POPE / CHAIR / MME metrics."""
    from mmeff_lab.evaluation.results import atomic_write_text

    if clipscore and benchmark != "chair":
        raise MmeffError("--clipscore scores captions: it applies to mmeff score chair only")
    if benchmark == "pope":
        scores = score_pope(predictions, questions, data)
    elif benchmark == "chair":
        scorer = None
        if clipscore:  # the model loads (or fails) before anything is scored
            from mmeff_lab.evaluation.clipscore import load_scorer
            from mmeff_lab.models.loading import resolve_device

            scorer = load_scorer(clipscore, resolve_device("auto"))
            image_path = _caption_images(data, image_dir)
        scores = score_chair(predictions, annotations, data, protocol, images)
        if scorer is not None:
            add_clipscore(scores, scorer, image_path)
    elif benchmark == "mme":
        scores = score_mme(predictions)
    else:
        raise MmeffError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    if output is not None:
        atomic_write_text(output / f"{benchmark}_scores.json", json.dumps(scores, indent=1) + "\n")
    _show(benchmark, scores)


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
