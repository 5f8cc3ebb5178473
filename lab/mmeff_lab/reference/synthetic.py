"""Synthetic POPE / CHAIR / MME benchmarks from held-out scene seeds, in the official file formats.

Layout of a benchmark folder (image ids are the scene seeds):

    manifest.json                      sha256 of every file below, sizes, seed ranges, version
    images/synth_{seed:012d}.jpg       POPE and CHAIR images (one folder, like COCO val2014)
    pope/coco_pope_{random,popular,adversarial}.json   JSON lines {question_id, image, text, label}
    chair/instances_synth.json         COCO instances format (pycocotools.coco.COCO reads it)
    chair/captions_synth.json          COCO captions format, two clean reference captions per image
    chair/synth_image_objects.json     CHAIR ground truth {image id: sorted canonical words}
    mme/MME_Benchmark/{existence,count,position,color}/synth_{seed:012d}.{jpg,txt}
                                       the official release layout of these four subtasks ("flat": image
                                       and its .txt side by side; each .txt = "question\\tYes" then
                                       "question\\tNo")
    mme/eval_tool/Your_Results/{subtask}.txt   MME eval_tool ground-truth lines "image\\tquestion\\tanswer"

Seeds: training uses `TRAIN_SEEDS`; benchmarks scan upwards from `seed_base + offset` (offsets in
`SEED_OFFSETS`), and `seed_base` must lie at or above `HELDOUT_SEED_BASE`, so the two never meet. Generation
is deterministic: the same sizes and seed_base give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .scenes import DEFAULT_GLYPHS, Scene, _glyph_polygons, make_scene, render
from .text import detailed_caption, short_caption
from .vocab import CATEGORIES, COCO_IDS, COLORS, GLYPH_STYLES, GROUP_OF, NUMBER_WORDS, article, plural

__all__ = [
    "HELDOUT_SEED_BASE",
    "MME_SUBTASKS",
    "POPE_STRATEGIES",
    "SEED_OFFSETS",
    "TRAIN_SEEDS",
    "VERSION",
    "BenchmarkIntegrityError",
    "default_cache_dir",
    "ensure_benchmarks",
    "image_name",
    "pope_questions",
    "verify_benchmarks",
    "write_benchmarks",
]

VERSION = "v2"  # bump whenever generation changes: it names the cache folder
TRAIN_SEEDS = range(100_000_000)
HELDOUT_SEED_BASE = 1_000_000_000
SEED_OFFSETS = {"pope": 0, "chair": 10_000_000, "existence": 20_000_000, "count": 30_000_000,
                "position": 40_000_000, "color": 50_000_000}
_SEED_SPAN = 10_000_000  # each benchmark scans at most this many seeds from its offset
POPE_STRATEGIES = ("random", "popular", "adversarial")
MME_SUBTASKS = ("existence", "count", "position", "color")
POPE_TEMPLATE = "Is there {} {} in the image?"
MME_SUFFIX = " Please answer yes or no."
POPE_SAMPLE_NUM = 3  # positives (and negatives) per POPE image, as in POPE's default
JPEG_QUALITY = 92
MANIFEST = "manifest.json"


class BenchmarkIntegrityError(RuntimeError):
    """A generated benchmark folder is incomplete, was changed, or was made with other settings."""


def image_name(seed: int) -> str:
    return f"synth_{seed:012d}.jpg"


def image_seed(name: str) -> int:
    """The scene seed of a benchmark image (inverse of :func:`image_name`)."""
    return int(Path(name).stem.split("_")[-1])


def pope_object(text: str) -> str:
    """The category a synthetic POPE question asks about (inverse of ``POPE_TEMPLATE``)."""
    prefix, suffix = POPE_TEMPLATE.split("{} {}")
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"not a synthetic POPE question: {text!r}")
    return text[len(prefix):-len(suffix)].split(" ", 1)[1]


def default_cache_dir() -> Path:
    """`$MMEFF_CACHE/synthetic/<VERSION>` if MMEFF_CACHE is set, else `~/.cache/mmeff/synthetic/<VERSION>`."""
    root = os.environ.get("MMEFF_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "mmeff"
    return base / "synthetic" / VERSION


# ---------------------------------------------------------------- scene selection


def _scan(start: int, n: int, accept: Callable[[Scene], bool], glyphs: str) -> list[Scene]:
    out: list[Scene] = []
    for seed in range(start, start + _SEED_SPAN):
        if len(out) == n:
            return out
        scene = make_scene(seed, glyphs)
        if accept(scene):
            out.append(scene)
    raise RuntimeError(f"only {len(out)} of {n} acceptable scenes in seeds [{start}, {start + _SEED_SPAN})")


# ---------------------------------------------------------------- POPE


def _pope_line(qid: int, image: str, obj: str, label: str) -> str:
    # Same keys, order and separators as the official files (json.dumps of an insertion-ordered dict).
    return json.dumps({"question_id": qid, "image": image, "text": POPE_TEMPLATE.format(article(obj), obj),
                       "label": label})


def _positives(scene: Scene) -> list[str]:
    cats = list(scene.categories)
    order = np.random.default_rng([scene.seed, 11]).permutation(len(cats))
    return [cats[i] for i in order[:POPE_SAMPLE_NUM]]


def pope_questions(scenes: list[Scene], strategy: str) -> list[dict[str, object]]:
    """POPE's sampling over `scenes` (each with >= 3 categories): per image 3 (yes, no) pairs.

    random: uniform over the dataset's categories absent from the image; popular: the most frequent
    (images containing it) absent category; adversarial: the absent category co-occurring most often with
    the paired positive object. Categories already asked about are skipped; ties go to vocabulary order;
    popular/adversarial fall back to random when nothing is left, as POPE does.
    """
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; known: {POPE_STRATEGIES}")
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    freq: dict[str, int] = {}
    co: dict[str, dict[str, int]] = {}
    for s in scenes:
        for c in s.categories:
            freq[c] = freq.get(c, 0) + 1
            for d in s.categories:
                if d != c:
                    co.setdefault(c, {})[d] = co.setdefault(c, {}).get(d, 0) + 1
    dataset = sorted(freq, key=rank.__getitem__)
    popular = sorted(dataset, key=lambda c: (-freq[c], rank[c]))
    co_sorted = {c: sorted(v, key=lambda d: (-v[d], rank[d])) for c, v in co.items()}
    out: list[dict[str, object]] = []
    for s in scenes:
        if len(s.categories) < POPE_SAMPLE_NUM:
            raise ValueError(f"POPE needs >= {POPE_SAMPLE_NUM} categories per image; seed {s.seed} has "
                             f"{len(s.categories)}")
        rng = np.random.default_rng([s.seed, 13])
        asked: list[str] = []
        for pos in _positives(s):
            asked.append(pos)
            out.append({"image": image_name(s.seed), "object": pos, "label": "yes"})
            ranked = {"random": [], "popular": popular, "adversarial": co_sorted.get(pos, [])}[strategy]
            neg = next((c for c in ranked if c not in asked and c not in s.counts), None)
            if neg is None:
                pool = [c for c in dataset if c not in asked and c not in s.counts]
                if not pool:
                    raise RuntimeError(f"no absent category left for a POPE negative of seed {s.seed}")
                neg = pool[int(rng.integers(len(pool)))]
            asked.append(neg)
            out.append({"image": image_name(s.seed), "object": neg, "label": "no"})
    for qid, q in enumerate(out, start=1):
        q["question_id"] = qid
    return out


# ---------------------------------------------------------------- MME


def _count_question(category: str, n: int) -> str:
    if n == 1:
        return f"Is there only one {category} in the image?"
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"Are there {word} {plural(category)} in the image?"


def _mme_pair(task: str, scene: Scene) -> tuple[str, str] | None:
    """(yes question, no question) for one image, or None when the scene does not suit the subtask."""
    rng = np.random.default_rng([scene.seed, 17])
    cats = list(scene.categories)
    if task == "existence":
        absent = [c for c in CATEGORIES if c not in scene.counts]
        yes, no = cats[int(rng.integers(len(cats)))], absent[int(rng.integers(len(absent)))]
        return (f"Is there {article(yes)} {yes} in this image?", f"Is there {article(no)} {no} in this image?")
    if task == "count":
        c = cats[int(rng.integers(len(cats)))]
        k = scene.counts[c]
        wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
        return _count_question(c, k), _count_question(c, wrong)
    singles = [o for o in scene.objects if scene.counts[o.category] == 1]
    if task == "position":
        # Only clearly placed objects (centre outside the middle 40%), so the answer is not a judgement call.
        centres = [(o, (o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2) for o in singles]
        cands = [(o, side) for o, x, y in centres
                 for side, val in (("left", 0.3 - x), ("right", x - 0.7), ("top", 0.3 - y), ("bottom", y - 0.7))
                 if val > 0]
        if not cands:
            return None
        o, side = cands[int(rng.integers(len(cands)))]
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
        phrase = {"left": "on the left side", "right": "on the right side", "top": "at the top",
                  "bottom": "at the bottom"}
        return (f"Is the {o.category} {phrase[side]} of the image?",
                f"Is the {o.category} {phrase[opposite]} of the image?")
    if task == "color":
        if not singles:
            return None
        o = singles[int(rng.integers(len(singles)))]
        other = [c for c in COLORS if c != o.color]
        wrong = other[int(rng.integers(len(other)))]
        return (f"Is there {article(o.color)} {o.color} {o.category} in the image?",
                f"Is there {article(wrong)} {wrong} {o.category} in the image?")
    raise ValueError(f"unknown MME subtask {task!r}; known: {MME_SUBTASKS}")


# ---------------------------------------------------------------- COCO-format CHAIR files


def _clip_polygon(poly: np.ndarray, size: int) -> list[float]:
    return [round(float(v), 2) for v in np.clip(poly * size, 0, size).reshape(-1)]


def _polygon_area(flat: list[float]) -> float:
    x, y = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _chair_files(scenes: list[Scene], size: int) -> dict[str, object]:
    images = [{"id": s.seed, "file_name": image_name(s.seed), "width": size, "height": size} for s in scenes]
    categories = [{"id": COCO_IDS[c], "name": c, "supercategory": GROUP_OF[c]} for c in CATEGORIES]
    anns, caps, objects = [], [], {}
    for s in scenes:
        for o in s.objects:  # the glyph's body polygon doubles as the COCO segmentation
            seg = _clip_polygon(_glyph_polygons(o.glyph, o.cx, o.cy, o.half, o.aspect, o.angle)[0], size)
            anns.append({"id": len(anns) + 1, "image_id": s.seed, "category_id": COCO_IDS[o.category],
                         "segmentation": [seg], "area": round(_polygon_area(seg), 2),
                         "bbox": [round(v, 2) for v in o.bbox_xywh(size)], "iscrowd": 0})
        for text in (detailed_caption(s), short_caption(s)):
            caps.append({"image_id": s.seed, "id": len(caps) + 1, "caption": text})
        objects[str(s.seed)] = sorted(s.categories)
    info = {"description": f"mmeff synthetic scenes {VERSION}", "version": VERSION}
    return {
        "instances_synth.json": {"info": info, "licenses": [], "images": images, "annotations": anns,
                                 "categories": categories},
        "captions_synth.json": {"info": info, "licenses": [], "images": images, "annotations": caps},
        "synth_image_objects.json": objects,
    }


# ---------------------------------------------------------------- writing and checking


def _jpeg(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p


def _params(n_pope_images: int, n_chair_images: int, n_mme_images: int, seed_base: int, image_size: int,
            glyphs: str) -> dict[str, int | str]:
    if seed_base < HELDOUT_SEED_BASE:
        raise ValueError(f"seed_base {seed_base} is below HELDOUT_SEED_BASE {HELDOUT_SEED_BASE}: benchmark "
                         f"seeds would overlap the training seeds {TRAIN_SEEDS}")
    for name, n in (("n_pope_images", n_pope_images), ("n_chair_images", n_chair_images),
                    ("n_mme_images", n_mme_images)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if glyphs not in GLYPH_STYLES:
        raise ValueError(f"unknown glyph style {glyphs!r}; known: {sorted(GLYPH_STYLES)}")
    return {"n_pope_images": n_pope_images, "n_chair_images": n_chair_images, "n_mme_images": n_mme_images,
            "seed_base": seed_base, "image_size": image_size, "glyphs": glyphs}


def write_benchmarks(out_dir: str | os.PathLike[str], *, n_pope_images: int = 500, n_chair_images: int = 500,
                     n_mme_images: int = 100, seed_base: int = HELDOUT_SEED_BASE, image_size: int = 224,
                     glyphs: str = DEFAULT_GLYPHS) -> Path:
    """Generate all three benchmarks into `out_dir` (must not exist yet); `n_mme_images` is per subtask.

    Files are built in a temporary sibling folder that is renamed into place at the end, so a crash never
    leaves a half-written benchmark behind. Returns `out_dir`.
    """
    params = _params(n_pope_images, n_chair_images, n_mme_images, seed_base, image_size, glyphs)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; write_benchmarks only creates new folders")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _generate(tmp, params)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _generate(root: Path, p: dict) -> None:
    base, size, glyphs = p["seed_base"], p["image_size"], p["glyphs"]
    pope = _scan(base + SEED_OFFSETS["pope"], p["n_pope_images"], lambda s: len(s.categories) >= POPE_SAMPLE_NUM,
                 glyphs)
    chair = _scan(base + SEED_OFFSETS["chair"], p["n_chair_images"], lambda s: True, glyphs)
    for s in pope + chair:
        _write(root / "images" / image_name(s.seed), _jpeg(s, size))
    for strategy in POPE_STRATEGIES:
        lines = [_pope_line(q["question_id"], q["image"], q["object"], q["label"])  # type: ignore[arg-type]
                 for q in pope_questions(pope, strategy)]
        _write(root / "pope" / f"coco_pope_{strategy}.json", "".join(line + "\n" for line in lines))
    for name, obj in _chair_files(chair, size).items():
        compact = name == "synth_image_objects.json"  # same style as the shipped COCO CHAIR ground truth
        _write(root / "chair" / name, json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj))
    for task in MME_SUBTASKS:
        rows = []
        for s in _scan(base + SEED_OFFSETS[task], p["n_mme_images"], lambda s, t=task: _mme_pair(t, s) is not None,
                       glyphs):
            yes, no = (q + MME_SUFFIX for q in _mme_pair(task, s))  # type: ignore[union-attr]
            folder = root / "mme" / "MME_Benchmark" / task
            _write(folder / image_name(s.seed), _jpeg(s, size))
            _write((folder / image_name(s.seed)).with_suffix(".txt"), f"{yes}\tYes\n{no}\tNo\n")
            rows += [f"{image_name(s.seed)}\t{yes}\tYes\n", f"{image_name(s.seed)}\t{no}\tNo\n"]
        _write(root / "mme" / "eval_tool" / "Your_Results" / f"{task}.txt", "".join(rows))
    manifest = {
        "format": "mmeff-synthetic-benchmarks", "version": VERSION, "params": p,
        "seed_ranges": {k: [p["seed_base"] + v, p["seed_base"] + v + _SEED_SPAN] for k, v in SEED_OFFSETS.items()},
        "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop],
        "files": {f.relative_to(root).as_posix(): _sha256(f) for f in _files(root)},
    }
    _write(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_benchmarks(root: str | os.PathLike[str], params: dict[str, int | str] | None = None) -> dict[str, object]:
    """Check every file listed in the manifest against its sha256 (and the settings, if given).

    Raises BenchmarkIntegrityError naming the first problem; returns the manifest.
    """
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BenchmarkIntegrityError(f"{mpath} is missing: {root} is not a complete benchmark folder; delete it")
    try:
        manifest = json.loads(mpath.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchmarkIntegrityError(f"{mpath} is unreadable ({e}); delete {root} to regenerate") from e
    if manifest.get("version") != VERSION:
        raise BenchmarkIntegrityError(f"{mpath}: version {manifest.get('version')!r}, expected {VERSION!r}")
    if params is not None and manifest.get("params") != params:
        raise BenchmarkIntegrityError(f"{mpath}: made with {manifest.get('params')}, requested {params}")
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise BenchmarkIntegrityError(f"{path} listed in {mpath} is missing; delete {root} to regenerate")
        if _sha256(path) != digest:
            raise BenchmarkIntegrityError(f"{path}: sha256 differs from {mpath}; the file was changed or "
                                          f"corrupted, delete {root} to regenerate")
    return manifest


def ensure_benchmarks(cache_dir: str | os.PathLike[str] | None = None, **sizes: int | str) -> Path:
    """Return a verified benchmark folder under `cache_dir` (default `default_cache_dir()`), making it if absent.

    `sizes` are write_benchmarks' keyword arguments; each combination gets its own sub-folder named after
    it. An existing folder whose checksums do not match raises BenchmarkIntegrityError.
    """
    unknown = set(sizes) - {"n_pope_images", "n_chair_images", "n_mme_images", "seed_base", "image_size", "glyphs"}
    if unknown:
        raise TypeError(f"ensure_benchmarks got unknown settings {sorted(unknown)}")
    params = _params(**{"n_pope_images": 500, "n_chair_images": 500, "n_mme_images": 100,
                        "seed_base": HELDOUT_SEED_BASE, "image_size": 224, "glyphs": DEFAULT_GLYPHS, **sizes})
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = "pope{n_pope_images}_chair{n_chair_images}_mme{n_mme_images}_seed{seed_base}_px{image_size}_{glyphs}"
    target = root / key.format(**params)
    if not target.exists():
        try:
            write_benchmarks(target, **params)
        except (FileExistsError, OSError):
            if not (target / MANIFEST).is_file():  # lost a race only if another process finished it
                raise
    verify_benchmarks(target, params)
    return target
