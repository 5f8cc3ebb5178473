"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, as the official evaluator computes it.

Re-implements ``chair.py`` of LisaAnne/Hallucination in its Python-3 standalone form (Maxlinn's
CHAIR-metric-standalone, also embedded in OPERA and others, with the Recall metric). Three protocols
(:data:`PROTOCOLS`) differ only in how each token is normalised before matching (``chair_words.py``):

* ``original`` (default): ``pattern.en.singularize`` on every token, as the standalone script -- and so the
  official cached ground truth -- does;
* ``opera``: OPERA's ``chair.py``: nltk POS tags, then the WordNet lemma under each tag (needs nltk data that
  only nltk's downloader provides);
* ``wordnet``: the WordNet noun lemma of every token (offline, ``nlp.py``), mmeff's rule before the protocols.

Shared by all: tokens = ``nltk.word_tokenize(caption.lower())`` (offline, ``nlp.py``); official double words
merged left to right ("baby X"/"adult X" -> X for animal words, "passenger jet/train" -> jet/train, "toilet
seat" -> toilet, "train track" kept as one non-object word, ...); "seat" dropped when "toilet" is present; words
in the synonym list mapped to their COCO category ("node word"). The synonym list is parsed exactly as the
official code does (``line.strip().split(', ')``), so its quirks (e.g. " motor bike" with a leading space never
matching) are kept on purpose.

Ground truth: the shipped ``coco2014_image_objects.json.gz`` (the official object sets of all COCO 2014
images: instance categories plus caption mentions, built with the ``original`` words) or built from COCO
``instances_*.json`` and ``captions_*.json`` with pycocotools the official way, with the chosen protocol's words.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.errors import MmeffError

from ._io import read_json_records, read_text, require, shipped_path
from .chair_words import Lemmatizer, Tagger, nltk_opera_tools, opera_normalise, singularize
from .errors import DataError
from .nlp import lemmatize_noun, word_tokenize

# name -> what it is (recorded with every result)
PROTOCOLS: dict[str, str] = {
    "original": "the standalone CHAIR script (pattern.en.singularize per token)",
    "opera": "OPERA chair.py (nltk POS tag, WordNet lemma per tag)",
    "wordnet": "WordNet noun lemma per token (mmeff before the protocols)",
}
DEFAULT_PROTOCOL = "original"
Normaliser = Callable[[list[str]], list[str]]

# The official hard-coded rules, verbatim in content.
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
    "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                "animal", "cub")
VEHICLE_WORDS = ("jet", "train")


def _double_word_dict() -> dict[str, str]:
    d = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        d[f"baby {animal}"] = animal
        d[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        d[f"passenger {vehicle}"] = vehicle
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"
    return d


DOUBLE_WORDS = _double_word_dict()


def load_synonyms(path: str | Path | None = None) -> dict[str, str]:
    """Map every synonym to its category's canonical word (first of its line), the official way."""
    path = shipped_path("synonyms.txt") if path is None else Path(path)
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        words = line.strip().split(", ")
        if any(not w for w in words):
            raise DataError(path, "empty synonym (doubled comma?)", lineno)
        for w in words:
            mapping[w] = words[0]
    if not mapping:
        raise DataError(path, "no synonyms in file")
    return mapping


@cache
def _default_synonyms() -> dict[str, str]:
    return load_synonyms()


@dataclass(frozen=True)
class CaptionWords:
    words: list[str]  # COCO object words as written (after lemmatising and merging)
    node_words: list[str]  # their categories
    idxs: list[int]  # index of each in the token list (before merging), as the official code keeps
    raw_words: list[str]  # all words after merging; Len counts these


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise MmeffError(f"unknown CHAIR protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def normaliser(protocol: str = DEFAULT_PROTOCOL, opera_tools: tuple[Tagger, Lemmatizer] | None = None) -> Normaliser:
    """The protocol's token -> word function over a caption's token list. ``opera_tools`` = (tagger, lemmatiser)
    replaces nltk's (whose data is rarely installed: see ``chair_words.py``)."""
    check_protocol(protocol)
    if protocol == "original":
        return lambda tokens: [singularize(w) for w in tokens]
    if protocol == "wordnet":
        return lambda tokens: [lemmatize_noun(w) for w in tokens]
    tagger, lemmatizer = nltk_opera_tools() if opera_tools is None else opera_tools
    return lambda tokens: opera_normalise(tokens, tagger, lemmatizer)


def caption_to_words(caption: str, synonyms: Mapping[str, str] | None = None,
                     protocol: str | Normaliser = DEFAULT_PROTOCOL) -> CaptionWords:
    """The official ``caption_to_words``; ``protocol`` = a protocol name or a :func:`normaliser`."""
    synonyms = _default_synonyms() if synonyms is None else synonyms
    normalise = normaliser(protocol) if isinstance(protocol, str) else protocol
    words = normalise(word_tokenize(caption.lower()))
    merged: list[str] = []
    idxs: list[int] = []
    i = 0
    while i < len(words):
        idxs.append(i)
        pair = " ".join(words[i:i + 2])
        if pair in DOUBLE_WORDS:
            merged.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    kept = merged
    # "the seat of the toilet" must not fire for chair (official rule; idxs realign as in the original).
    if "toilet" in kept and "seat" in kept:
        kept = [w for w in kept if w != "seat"]
    obj_idxs = [idxs[k] for k, w in enumerate(kept) if w in synonyms]
    objs = [w for w in kept if w in synonyms]
    return CaptionWords(objs, [synonyms[w] for w in objs], obj_idxs, merged)


def _image_id(value: Any, path: str | Path, lineno: int | None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(?:COCO_\w+?_|synth_)?0*(\d+)(?:\.\w+)?", value.strip())  # synth_: the synthetic set
        if m:
            return int(m.group(1))
    raise DataError(path, f"image_id {value!r} is neither an integer nor a COCO file name (or a synthetic one)", lineno)


def load_captions(path: str | Path, image_id_key: str = "image_id",
                  caption_key: str = "caption") -> list[tuple[int, str]]:
    """Generated captions from a JSON list or JSON lines of ``{image_id, caption}``."""
    out = []
    for lineno, obj in read_json_records(path):
        if image_id_key not in obj:
            raise DataError(path, f"missing field {image_id_key!r}", lineno)
        out.append((_image_id(obj[image_id_key], path, lineno), require(path, lineno, obj, caption_key, str)))
    if not out:
        raise DataError(path, "no captions in file")
    return out


def pope_image_ids() -> list[int]:
    """The 500 COCO val2014 images of POPE (the CHAIR set of the papers), in order of first appearance."""
    from .pope import load_split

    seen: dict[int, None] = {}
    for q in load_split("pope_random"):
        seen.setdefault(_image_id(q.image, "coco_pope_random.json", q.line), None)
    return list(seen)


def load_image_ids(path: str | Path) -> list[int]:
    """Image ids from a JSON list or one per line (integers or COCO file names); order kept, repeats dropped."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = [(None, v) for v in json.loads(text)]
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(path, f"not a JSON list of image ids ({e})") from e
    else:
        items = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    ids = list(dict.fromkeys(_image_id(v, path, n) for n, v in items))
    if not ids:
        raise DataError(path, "no image ids in file")
    return ids


def image_set(spec: str | Path) -> tuple[str, list[int]]:
    """``pope`` (the 500 POPE images) or a file of image ids -> (label recorded with results, ids)."""
    if str(spec) == "pope":
        return "pope", pope_image_ids()
    if not Path(spec).is_file():
        raise DataError(spec, "CHAIR image set is neither 'pope' nor a file of image ids")
    return str(spec), load_image_ids(spec)


def load_ground_truth(path: str | Path | None = None) -> dict[int, frozenset[str]]:
    """Object sets per image id from a gzipped JSON ``{image_id: [node words]}`` (default: shipped)."""
    path = shipped_path("coco2014_image_objects.json.gz") if path is None else Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"corrupt or truncated ground-truth file ({e})") from e
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object mapping image ids to object lists")
    return {int(k): frozenset(v) for k, v in data.items()}


def ground_truth_from_coco(instances_files: Sequence[str | Path], captions_files: Sequence[str | Path],
                           synonyms: Mapping[str, str] | None = None,
                           protocol: str | Normaliser = DEFAULT_PROTOCOL) -> dict[int, frozenset[str]]:
    """Build object sets the official way: instance categories + objects mentioned in reference captions
    (read with ``protocol``'s words; ``original`` gives the official sets).

    Pass both train2014 and val2014 files for the official sets. Every image listed in the files is
    known (possibly with an empty set).
    """
    from pycocotools.coco import COCO

    synonyms = _default_synonyms() if synonyms is None else synonyms
    normalise = normaliser(protocol) if isinstance(protocol, str) else protocol
    objects: dict[int, set[str]] = {}

    def load(path: str | Path) -> Any:
        if not Path(path).is_file():
            raise DataError(path, "COCO annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                return COCO(str(path))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
            raise DataError(path, f"not a valid COCO annotation file ({type(e).__name__}: {e})") from e

    for path in instances_files:
        coco = load(path)
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        for img in coco.getImgIds():
            objects.setdefault(img, set())
        for ann in coco.loadAnns(coco.getAnnIds()):
            if ann["category_id"] not in names or names[ann["category_id"]] not in synonyms:
                raise DataError(path, f"annotation {ann.get('id')} has unknown category {ann['category_id']}")
            objects.setdefault(ann["image_id"], set()).add(synonyms[names[ann["category_id"]]])
    for path in captions_files:
        coco = load(path)
        for img in coco.getImgIds():
            objects.setdefault(img, set())
        for ann in coco.loadAnns(coco.getAnnIds()):
            objects.setdefault(ann["image_id"], set()).update(
                caption_to_words(ann["caption"], synonyms, normalise).node_words)
    return {k: frozenset(v) for k, v in objects.items()}


@cache
def _default_ground_truth() -> dict[int, frozenset[str]]:
    return load_ground_truth()


@dataclass
class ChairResult:
    metrics: dict[str, float]  # CHAIRs, CHAIRi, Recall (fractions), Len (mean words), n, n_skipped
    sentences: list[dict[str, Any]]  # per caption, with the official keys

    def sample_matrix(self) -> np.ndarray:
        """(n, 5) per caption: [hallucinated?, hallucinated mentions, mentions, recalled, gt objects]."""
        return np.array([[s["metrics"]["CHAIRs"], len(s["mscoco_hallucinated_words"]),
                          len(s["mscoco_generated_words"]), s["n_recalled"], len(s["mscoco_gt_words"])]
                         for s in self.sentences], dtype=np.float64).reshape(-1, 5)


def evaluate_chair(captions: Iterable[tuple[int, str]],
                   ground_truth: Mapping[int, frozenset[str]] | None = None,
                   synonyms: Mapping[str, str] | None = None, skip_missing: bool = False,
                   protocol: str | Normaliser = DEFAULT_PROTOCOL) -> ChairResult:
    """CHAIR_S, CHAIR_I, Recall and Len over (image_id, caption) pairs, with ``protocol``'s words.

    An image id without ground truth is an error (the official code silently treats it as having no
    objects); ``skip_missing`` drops such captions and reports how many in ``n_skipped``.
    """
    normalise = normaliser(protocol) if isinstance(protocol, str) else protocol
    ground_truth = _default_ground_truth() if ground_truth is None else ground_truth
    sentences: list[dict[str, Any]] = []
    skipped = 0
    for image_id, caption in captions:
        if image_id not in ground_truth:
            if skip_missing:
                skipped += 1
                continue
            raise DataError("<ground truth>", f"no ground-truth objects for image id {image_id}")
        gt = ground_truth[image_id]
        cw = caption_to_words(caption, synonyms, normalise)
        hallucinated = [(w, n) for w, n in zip(cw.words, cw.node_words) if n not in gt]
        recalled = {n for n in cw.node_words if n in gt}
        sentences.append({
            "image_id": image_id, "caption": caption,
            "mscoco_hallucinated_words": hallucinated,
            "mscoco_gt_words": sorted(gt),
            "mscoco_generated_words": list(cw.node_words),
            "hallucination_idxs": [i for i, n in zip(cw.idxs, cw.node_words) if n not in gt],
            "words": cw.raw_words,
            "n_recalled": len(recalled),
            "metrics": {"CHAIRs": int(bool(hallucinated)),
                        "CHAIRi": len(hallucinated) / len(cw.words) if cw.words else 0.0,
                        "Recall": len(recalled) / len(gt) if gt else 0.0},
        })
    if not sentences:
        raise DataError("<captions>", f"no captions to evaluate ({skipped} skipped)")
    m = ChairResult({}, sentences).sample_matrix()
    metrics = {
        "CHAIRs": float(m[:, 0].mean()),
        # No object mentioned at all: no hallucinated mention either (official code divides by zero).
        "CHAIRi": float(m[:, 1].sum() / m[:, 2].sum()) if m[:, 2].sum() else 0.0,
        "Recall": float(m[:, 3].sum() / m[:, 4].sum()) if m[:, 4].sum() else 0.0,
        "Len": float(np.mean([len(s["words"]) for s in sentences])),
        "n": len(sentences), "n_skipped": skipped,
    }
    return ChairResult(metrics, sentences)
