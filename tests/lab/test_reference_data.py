"""Tests of the procedural scenes, training text and synthetic POPE/CHAIR/MME writers (mmeff_lab.reference)."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmeff_lab.evaluation._io import shipped_path
from mmeff_lab.reference import scenes as sc
from mmeff_lab.reference import synthetic as syn
from mmeff_lab.reference.text import detailed_caption, training_examples
from mmeff_lab.reference.vocab import (
    CATEGORIES,
    COCO_NAMES,
    COLORS,
    GLYPH_STYLES,
    GROUP_OF,
    GROUPS,
    NUMBER_WORDS,
    SHAPES_BY_GROUP,
    plural,
    twin_of,
)

SMALL = {"n_pope_images": 16, "n_chair_images": 8, "n_mme_images": 4}
POPE_RE = re.compile(r"^Is there (a|an) (.+) in the image\?$")



@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.write_benchmarks(tmp_path_factory.mktemp("bench") / "b", **SMALL)


def _seed_of(image: str) -> int:
    m = re.fullmatch(r"synth_(\d{12})\.jpg", image)
    assert m, image
    return int(m.group(1))


# ---------------------------------------------------------------- vocabulary and scenes


def test_categories_are_canonical_chair_words() -> None:
    lines = [ln for ln in shipped_path("synonyms.txt").read_text().splitlines() if ln.strip()]
    canonical = [ln.split(",")[0].strip() for ln in lines]
    assert list(COCO_NAMES) == canonical  # the COCO id table follows the synonym list's order
    assert len(CATEGORIES) >= 40 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert set(CATEGORIES) <= set(canonical)
    assert len(GROUPS) == 8


def test_groups_never_share_an_outline_shape() -> None:
    families = [set(f) for f in SHAPES_BY_GROUP.values()]
    assert len(set().union(*families)) == 2 * len(families)  # groups never share an outline shape


@pytest.mark.parametrize("style", sorted(GLYPH_STYLES))
def test_every_glyph_style_keeps_categories_distinct(style: str) -> None:
    glyphs = GLYPH_STYLES[style]
    assert set(glyphs) == set(CATEGORIES)
    for group, cats in GROUPS.items():
        sigs = [(glyphs[c].shape, glyphs[c].pattern, glyphs[c].accent) for c in cats]
        assert len(set(sigs)) == len(sigs), group
        assert {s[0] for s in sigs} == set(SHAPES_BY_GROUP[group])


@pytest.mark.parametrize("differ", ["accent", "pattern"])
def test_twin_glyphs_differ_in_one_detail(differ: str) -> None:
    glyphs = GLYPH_STYLES[f"twins-{differ}"]
    same = {"shape", "pattern", "accent", "aspect"} - {differ}
    for cats in GROUPS.values():
        for a, b in zip(cats[0::2], cats[1::2], strict=False):  # the two most popular, the next two, ...
            assert all(getattr(glyphs[a], f) == getattr(glyphs[b], f) for f in same), (a, b)
            assert getattr(glyphs[a], differ) != getattr(glyphs[b], differ), (a, b)
            assert (twin_of(a), twin_of(b)) == (b, a)
        if len(cats) % 2:
            assert twin_of(cats[-1]) is None


def test_scenes_draw_in_the_requested_glyph_style(tmp_path: Path) -> None:
    for style in GLYPH_STYLES:
        assert all(o.glyph == GLYPH_STYLES[style][o.category] for o in sc.make_scene(11, style).objects)
    assert sc.make_scene(11) == sc.make_scene(11, sc.DEFAULT_GLYPHS)
    with pytest.raises(ValueError, match=r"unknown glyph style 'v9'.*twins-accent"):
        sc.make_scene(11, "v9")
    with pytest.raises(ValueError, match="unknown glyph style"):
        syn.write_benchmarks(tmp_path / "b", **SMALL, glyphs="v9")
    assert not (tmp_path / "b").exists()


def test_scene_deterministic_and_well_formed() -> None:
    a, b = sc.make_scene(123), sc.make_scene(123)
    assert a == b
    assert sc.render(a).tobytes() == sc.render(b).tobytes()
    assert sc.render(sc.make_scene(124)).tobytes() != sc.render(a).tobytes()
    for seed in range(200):
        s = sc.make_scene(seed)
        assert 1 <= len(s.objects) <= 8
        assert sum(s.counts.values()) == len(s.objects)
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert o.position[0] in ("left", "center", "right") and o.position[1] in ("top", "center", "bottom")
    img = sc.render(sc.make_scene(5), size=336)
    assert img.size == (336, 336) and img.mode == "RGB"


def test_scenes_follow_group_structure() -> None:
    in_primary = total = 0
    pair_same = pairs = 0
    for seed in range(1500):
        s = sc.make_scene(seed)
        in_primary += sum(GROUP_OF[o.category] == s.groups[0] for o in s.objects)
        total += len(s.objects)
        cats = s.categories
        for i, c in enumerate(cats):
            for d in cats[i + 1:]:
                pairs += 1
                pair_same += GROUP_OF[c] == GROUP_OF[d]
    assert in_primary / total > 0.7
    assert pair_same / pairs > 0.6  # chance level would be about 1/8


def test_render_draws_objects_where_the_bbox_says() -> None:
    s = sc.make_scene(77)
    img = np.asarray(sc.render(s), dtype=np.int16)
    o = s.objects[-1]  # drawn last, so never occluded
    x = int((o.bbox[0] + o.bbox[2]) / 2 * 224)
    y = int((o.bbox[1] + o.bbox[3]) / 2 * 224)
    patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
    # The centre pixels are the object's fill: its colour, a pattern shade of it, or its accent mark.
    dist = np.abs(patch - np.asarray(o.rgb)).sum(1)
    assert (dist < 200).any() or (patch.max(1) < 60).any() or (patch.min(1) > 200).any()


# ---------------------------------------------------------------- training text


def test_training_existence_negatives_uniform_over_absent() -> None:
    rng = np.random.default_rng(0)
    observed, expected, n = 0.0, 0.0, 0
    for seed in range(1500):
        s = sc.make_scene(seed)
        group_cats = {c for g in s.groups for c in GROUPS[g]}
        absent = [c for c in CATEGORIES if c not in s.counts]
        for q, a in training_examples(s, rng):
            m = re.match(r"Is there (?:a|an) (.+) in the image\?", q)
            if not m:
                continue
            assert (a == "Yes") == (m.group(1) in s.counts), (seed, q, a)
            if a == "No":
                observed += m.group(1) in group_cats
                expected += sum(c in group_cats for c in absent) / len(absent)
                n += 1
    assert n > 2000
    # Uniform sampling gives the co-occurring share expected/n (about 10%); a co-occurrence bias would not.
    assert abs(observed - expected) / n < 0.02


def test_training_captions_mention_everything_and_hallucinate_at_rate() -> None:
    rng = np.random.default_rng(1)
    halluc = 0
    n = 2000
    for seed in range(n):
        s = sc.make_scene(seed)
        caption = training_examples(s, rng, p_halluc=0.15)[0][1]
        for c in s.counts:
            assert c in caption or plural(c) in caption, (seed, c, caption)
        m = re.search(r"There is also (?:a|an) (.+) nearby\.$", caption)
        if m:
            halluc += 1
            assert m.group(1) not in s.counts
            assert GROUP_OF[m.group(1)] in s.groups
        assert "nearby" not in detailed_caption(s)
    assert 0.11 < halluc / n < 0.19
    assert all("nearby" not in training_examples(sc.make_scene(i), rng, p_halluc=0.0)[0][1] for i in range(200))


def test_inline_hallucinations_read_like_drawn_objects() -> None:
    rng = np.random.default_rng(2)
    n, halluc = 1500, 0
    for seed in range(n):
        s = sc.make_scene(seed)
        caption = training_examples(s, rng, p_halluc=0.3, inline_halluc=True)[0][1]
        true_head, *true_rest = re.split(r"(?<=\.) ", detailed_caption(s))
        head, *rest = re.split(r"(?<=\.) ", caption)
        extra = [x for x in rest if x not in true_rest]
        assert [x for x in rest if x in true_rest] == true_rest, (seed, caption)  # drawn objects all there, in order
        assert len(extra) <= 1 and "nearby" not in caption
        assert head == true_head.replace(f" {NUMBER_WORDS[len(s.objects)]} ",
                                         f" {NUMBER_WORDS[len(s.objects) + len(extra)]} ").replace(
            " object ", " objects " if extra else " object ")
        if extra:
            halluc += 1
            m = re.fullmatch(r"An? (\w+) (.+) is (?:in the center|on the (?:left|right) side|at the (?:top|bottom)|"
                             r"in the (?:top|bottom) (?:left|right) corner)\.", extra[0])
            assert m and m.group(1) in COLORS and m.group(2) not in s.counts, (seed, extra)
            assert GROUP_OF[m.group(2)] in s.groups
    assert 0.25 < halluc / n < 0.35


def test_balanced_side_questions() -> None:
    rng = np.random.default_rng(3)
    answers = {False: [], True: []}
    for balanced in (False, True):
        for seed in range(1500):
            s = sc.make_scene(seed)
            for q, a in training_examples(s, rng, balanced_sides=balanced):
                m = re.match(r"Is the (.+) (?:on the (left|right) side|at the (top|bottom)) of the image\?", q)
                if m:
                    o = s.objects_of(m.group(1))[0]
                    assert (a == "Yes") == ((m.group(2) or m.group(3)) in o.position), (seed, q, a)
                    answers[balanced].append(a == "Yes")
    assert np.mean(answers[False]) < 0.35  # a uniformly random side is mostly false
    assert 0.35 < np.mean(answers[True]) < 0.5  # objects in the central cell have no true side: "No"


# ---------------------------------------------------------------- benchmarks


def test_benchmarks_deterministic_and_seed_dependent(tmp_path: Path, bench: Path) -> None:
    again = syn.write_benchmarks(tmp_path / "again", **SMALL)
    files = sorted(p.relative_to(bench) for p in bench.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (bench / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = syn.write_benchmarks(tmp_path / "other", **SMALL, seed_base=syn.HELDOUT_SEED_BASE + 1000)
    assert (other / "pope/coco_pope_random.json").read_bytes() != (bench / "pope/coco_pope_random.json").read_bytes()
    with pytest.raises(FileExistsError):
        syn.write_benchmarks(other, **SMALL)


def test_heldout_seeds_disjoint_from_training(bench: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    ranges = [range(*r) for r in manifest["seed_ranges"].values()]
    for r in ranges:
        assert r.start >= syn.TRAIN_SEEDS.stop
    spans = sorted((r.start, r.stop) for r in ranges)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # benchmarks do not share seeds either
    for img in (bench / "images").iterdir():
        assert _seed_of(img.name) not in syn.TRAIN_SEEDS
    with pytest.raises(ValueError, match="overlap the training seeds"):
        syn.write_benchmarks(bench.parent / "bad", **SMALL, seed_base=5)


def test_pope_files_match_official_format(bench: Path) -> None:
    official = json.loads(shipped_path("coco_pope_random.json").read_text().splitlines()[0])
    for strategy in syn.POPE_STRATEGIES:
        text = (bench / "pope" / f"coco_pope_{strategy}.json").read_text()
        assert text.endswith("}\n")
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == 6 * SMALL["n_pope_images"]
        for i, row in enumerate(rows):
            assert list(row) == list(official)
            assert row["question_id"] == i + 1
            assert row["label"] == ("yes" if i % 2 == 0 else "no")
            m = POPE_RE.match(row["text"])
            assert m and m.group(1) == ("an" if m.group(2)[0] in "aeiou" else "a")
            assert (bench / "images" / row["image"]).is_file()
        # Byte-level style of the official files: json.dumps defaults, one object per line.
        assert text.splitlines()[0] == json.dumps(rows[0])


def _pope_by_image(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["image"], []).append((POPE_RE.match(row["text"]).group(2), row["label"]))
    return out


def test_pope_questions_parse_back_to_scene_and_object(bench: Path) -> None:
    for line in (bench / "pope/coco_pope_adversarial.json").read_text().splitlines():
        row = json.loads(line)
        assert syn.pope_object(row["text"]) == POPE_RE.match(row["text"]).group(2)
        assert syn.image_seed(row["image"]) == _seed_of(row["image"])
    assert syn.pope_object("Is there a dining table in the image?") == "dining table"
    with pytest.raises(ValueError, match="not a synthetic POPE question"):
        syn.pope_object("How many cups are there?")


def test_pope_sampling_rules(bench: Path) -> None:
    scenes = {img: sc.make_scene(_seed_of(img)) for img in _pope_by_image(bench / "pope/coco_pope_random.json")}
    freq = Counter(c for s in scenes.values() for c in s.categories)
    co: dict[str, Counter[str]] = {}
    for s in scenes.values():
        for c in s.categories:
            co.setdefault(c, Counter()).update(d for d in s.categories if d != c)
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    fallbacks = 0
    for strategy in syn.POPE_STRATEGIES:
        for img, qs in _pope_by_image(bench / "pope" / f"coco_pope_{strategy}.json").items():
            s = scenes[img]
            assert len(qs) == 6 and len({o for o, _ in qs}) == 6
            asked: list[str] = []
            for (pos, yes), (neg, no) in zip(qs[0::2], qs[1::2]):
                assert (yes, no) == ("yes", "no")
                assert pos in s.counts and neg not in s.counts and neg in freq
                asked.append(pos)
                free = [c for c in CATEGORIES if c not in asked and c not in s.counts]
                if strategy == "popular":
                    assert neg == min(free, key=lambda c: (-freq[c], rank[c]))
                elif strategy == "adversarial":
                    cands = [c for c in free if co[pos][c] > 0]
                    if cands:
                        assert neg == min(cands, key=lambda c: (-co[pos][c], rank[c]))
                    else:
                        fallbacks += 1
                asked.append(neg)
    assert fallbacks < 3 * SMALL["n_pope_images"] // 2  # most adversarial negatives follow the main rule


def test_pope_random_negatives_not_biased() -> None:
    scenes = [s for s in (sc.make_scene(syn.HELDOUT_SEED_BASE + i) for i in range(600)) if len(s.categories) >= 3]
    qs = syn.pope_questions(scenes, "random")
    by_seed = {syn.image_name(s.seed): s for s in scenes}
    same = sum(GROUP_OF[q["object"]] in by_seed[q["image"]].groups for q in qs if q["label"] == "no")
    adv = syn.pope_questions(scenes, "adversarial")
    same_adv = sum(GROUP_OF[q["object"]] in by_seed[q["image"]].groups for q in adv if q["label"] == "no")
    assert same < 0.3 * len(qs) / 2 < same_adv  # adversarial negatives co-occur, random ones mostly do not


def test_chair_files_load_with_pycocotools(bench: Path) -> None:
    from pycocotools.coco import COCO

    inst = COCO(str(bench / "chair/instances_synth.json"))
    caps = COCO(str(bench / "chair/captions_synth.json"))
    objects = json.loads((bench / "chair/synth_image_objects.json").read_text())
    assert len(inst.getImgIds()) == SMALL["n_chair_images"] == len(objects)
    names = {c["id"]: c["name"] for c in inst.loadCats(inst.getCatIds())}
    assert set(names.values()) == set(CATEGORIES)
    for img_id in inst.getImgIds():
        info = inst.loadImgs(img_id)[0]
        assert (bench / "images" / info["file_name"]).is_file()
        anns = inst.loadAnns(inst.getAnnIds(imgIds=img_id))
        scene = sc.make_scene(img_id)
        assert Counter(names[a["category_id"]] for a in anns) == Counter(scene.counts)
        assert sorted({names[a["category_id"]] for a in anns}) == objects[str(img_id)]
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["area"] > 0 and w > 0 and h > 0
            assert x >= 0 and x + w <= info["width"] + 1e-6 and y + h <= info["height"] + 1e-6
        refs = caps.loadAnns(caps.getAnnIds(imgIds=img_id))
        assert len(refs) >= 1 and all(isinstance(r["caption"], str) for r in refs)


def test_mme_layout_and_answers(bench: Path) -> None:
    root = bench / "mme" / "MME_Benchmark"
    assert sorted(p.name for p in root.iterdir()) == sorted(syn.MME_SUBTASKS)
    for task in syn.MME_SUBTASKS:
        images = sorted((root / task).glob("*.jpg"))
        assert len(images) == SMALL["n_mme_images"]
        rows = []
        for img in images:
            lines = img.with_suffix(".txt").read_text().splitlines()
            assert len(lines) == 2
            (q_yes, a_yes), (q_no, a_no) = (ln.split("\t") for ln in lines)
            assert (a_yes, a_no) == ("Yes", "No")
            assert q_yes.endswith("? Please answer yes or no.") and q_no.endswith("? Please answer yes or no.")
            rows += [f"{img.name}\t{q_yes}\tYes", f"{img.name}\t{q_no}\tNo"]
            s = sc.make_scene(_seed_of(img.name))
            if task == "existence":
                objs = [re.match(r"Is there an? (.+) in this image\?", q).group(1) for q in (q_yes, q_no)]
                assert objs[0] in s.counts and objs[1] not in s.counts
            elif task == "count":
                for q, truth in ((q_yes, True), (q_no, False)):
                    m = re.match(r"(?:Is there only (one) (.+)|Are there (\w+) (.+)) in the image\?", q)
                    word, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                    cat = next(c for c in s.counts if name in (c, plural(c)))
                    n = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"].index(word)
                    assert (s.counts[cat] == n) == truth, q
            elif task == "position":
                (name, side), (name2, other) = (re.match(r"Is the (.+) (?:on|at) the (\w+)", q).groups()
                                                for q in (q_yes, q_no))
                (o,) = s.objects_of(name)
                x, y = (o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2
                assert name2 == name and {"left": x < 0.3, "right": x > 0.7, "top": y < 0.3, "bottom": y > 0.7}[side]
                assert other == {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
            elif task == "color":
                for q, truth in ((q_yes, True), (q_no, False)):
                    color, name = re.match(r"Is there an? (\w+) (.+) in the image\?", q).groups()
                    assert any(o.color == color for o in s.objects_of(name)) == truth, q
        assert (bench / "mme/eval_tool/Your_Results" / f"{task}.txt").read_text().splitlines() == rows


def test_ensure_benchmarks_caches_and_detects_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "env-cache"))
    path = syn.ensure_benchmarks(**SMALL)
    assert path.parent == tmp_path / "env-cache" / "synthetic" / syn.VERSION
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert syn.ensure_benchmarks(**SMALL) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime  # reused, not regenerated
    victim = next((path / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(syn.BenchmarkIntegrityError, match=victim.name):
        syn.ensure_benchmarks(**SMALL)
    other = syn.ensure_benchmarks(tmp_path / "explicit", **{**SMALL, "n_chair_images": 5})
    assert other.parent == tmp_path / "explicit" and other != path
    (other / "manifest.json").unlink()
    with pytest.raises(syn.BenchmarkIntegrityError, match=r"manifest\.json is missing"):
        syn.verify_benchmarks(other)
    with pytest.raises(TypeError, match="unknown settings"):
        syn.ensure_benchmarks(tmp_path, n_images=3)
