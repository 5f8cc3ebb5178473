"""``mmeff score pope|chair|mme``: the official metrics on answers produced by any model or server.

Inputs are the official scripts' formats:
* POPE: answers as JSON lines ``{question_id, text}``, matched to a question file (``--questions`` = a file
  or a split name ``random|popular|adversarial``, default ``random``, from ``--data``);
* CHAIR: captions as a JSON list or JSON lines ``{image_id, caption}``; ground truth (``--annotations``) =
  a ``{image_id: [objects]}`` JSON (``.json`` or ``.json.gz``) or a folder with COCO ``instances_*.json`` and
  ``captions_*.json`` (built the official way with ``--protocol``'s words), default from ``--data``;
  ``--protocol original|opera|wordnet`` (default original: the standalone script's words); ``--images pope|FILE``
  scores only the captions of that image set (default: every caption);
* MME: a folder of per-subtask result files ``<subtask>.txt`` (or one such file) with
  ``image<TAB>question<TAB>answer<TAB>prediction`` lines.

``--data``: ``synthetic`` (default, as for ``mmeff eval``), a synthetic benchmark folder, or ``coco`` / a real
data folder: the shipped official POPE questions and CHAIR ground truth of COCO 2014.
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


def _data(data: str) -> Any:
    from mmeff_lab.evaluation.tasks import DataSource, resolve_data

    if data == "coco":
        return DataSource("real", Path("."))  # only the shipped question / ground-truth files are read
    return resolve_data(data)


def _pick(data: str, fits: Callable[[Any], bool], what: str) -> Any:
    """The benchmark the predictions belong to: ``--data`` as given, or with ``auto`` the shipped COCO files if
    every id matches them (POPE: every question answered, nothing else), else the synthetic set if it matches
    (generated on first use), else an error naming the flags — the ids decide, never a default."""
    if data != "auto":
        return _data(data)
    for name in ("coco", "synthetic"):
        source = _data(name)
        if fits(source):
            return source
    raise MmeffError(f"{what} match neither the COCO benchmark (--data coco) nor the synthetic one "
                     "(--data synthetic); pass --data with the benchmark folder they come from")


def score_pope(predictions: Path, questions: str, data: str) -> dict[str, Any]:
    from mmeff_lab.evaluation import pope
    from mmeff_lab.evaluation.errors import DataError

    if questions in ("random", "popular", "adversarial"):
        split = f"pope_{questions}"

        def split_questions(source: Any) -> list[Any]:
            path = source.pope_file(split)
            return pope.load_questions(path) if path is not None else pope.load_split(split)

        def fits(source: Any) -> bool:
            try:
                pope.load_answers(predictions, split_questions(source))
            except DataError:
                return False
            return True

        qs = split_questions(_pick(data, fits, f"the question ids of {predictions}"))
    elif _is_llava_question_file(Path(questions)):
        return {"splits": pope.score_llava_answers(predictions, questions)}
    else:
        qs = pope.load_questions(questions)
    answers = pope.load_answers(predictions, qs)
    return pope.pope_metrics(answers, [q.label for q in qs])


def _is_llava_question_file(path: Path) -> bool:
    """LLaVA's ``llava_pope_test.jsonl`` carries each question's split as ``category`` (no label)."""
    from mmeff_lab.evaluation._io import iter_json_lines

    first = next(iter(iter_json_lines(path)), None)
    return first is not None and "category" in first[1] and "label" not in first[1]


def _ground_truth(annotations: Path | None, data: str, predictions: Path,
                  protocol: str = "original") -> dict[int, frozenset[str]]:
    from mmeff_lab.evaluation import chair
    from mmeff_lab.evaluation.errors import DataError
    from mmeff_lab.evaluation.tasks import load_plain_ground_truth

    if annotations is None:
        if data != "auto":
            return _data(data).chair_ground_truth
        ids = {image_id for image_id, _ in chair.load_captions(predictions)}
        return _pick(data, lambda source: ids <= set(source.chair_ground_truth),
                     f"the image ids of {predictions}").chair_ground_truth
    if annotations.is_dir():
        instances = sorted(annotations.glob("instances_*.json"))
        captions = sorted(annotations.glob("captions_*.json"))
        if not instances or not captions:
            raise DataError(annotations, "need instances_*.json and captions_*.json (COCO annotation files)")
        return chair.ground_truth_from_coco(instances, captions, protocol=protocol)
    if annotations.name.endswith(".gz"):
        return chair.load_ground_truth(annotations)
    return load_plain_ground_truth(annotations)


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
    result = chair.evaluate_chair(captions, _ground_truth(annotations, data, predictions, protocol),
                                  protocol=normalise)
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
    if benchmark == "pope" and scores.get("non_yes_no"):
        Console(stderr=True).print(f"note: {scores['non_yes_no']} of {scores['n']} answers say neither yes nor no; "
                                   "the official rule scores them as yes", highlight=False)


def score_command(
    benchmark: str = typer.Argument(..., help="pope, chair or mme"),
    predictions: Path = typer.Option(..., "--predictions", help="Answers / captions file (MME: folder or file)."),
    questions: str = typer.Option("random", "--questions", help="POPE: random|popular|adversarial, a question "
                                  "file, or LLaVA's llava_pope_test.jsonl (per-split metrics)."),
    annotations: Path | None = typer.Option(None, "--annotations", help="CHAIR ground truth (file or COCO folder)."),
    protocol: str = typer.Option("original", "--protocol", help="CHAIR words: original (the standalone CHAIR "
                                 "script), opera (OPERA's chair.py) or wordnet (noun lemmas)."),
    images: str | None = typer.Option(None, "--images", help="CHAIR: score only the captions of pope (the 500 "
                                      "POPE images) or of the image ids in FILE (default: every caption)."),
    data: str = typer.Option("auto", "--data", help="auto (the benchmark whose ids the predictions match), coco, "
                             "synthetic or a benchmark folder."),
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
