"""POPE loaders and metrics against the real question files and hand-computed values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from mmeff_lab.evaluation._io import shipped_path
from mmeff_lab.evaluation.errors import DataError
from mmeff_lab.evaluation.pope import (
    POPE_SPLITS,
    load_answers,
    load_questions,
    load_split,
    parse_answer,
    pope_metrics,
    resolve_images,
)

# SHA-256 of the official question files (AoiDragon/POPE output/coco/ at 08d957b; md5 in evaluation/data/PROVENANCE.md),
# which the package ships byte for byte.
OFFICIAL_SHA256 = {
    "pope_random": "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994",
    "pope_popular": "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753",
    "pope_adversarial": "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8",
}


def _official(split: str) -> Path:
    return shipped_path(POPE_SPLITS[split])


@pytest.mark.parametrize("split", list(POPE_SPLITS))
def test_shipped_split_is_the_official_file(split: str) -> None:
    assert hashlib.sha256(_official(split).read_bytes()).hexdigest() == OFFICIAL_SHA256[split]
    real = load_questions(_official(split))
    assert load_split(split) == real
    assert len(real) == 3000 and sum(q.label == "yes" for q in real) == 1500
    assert len({q.image for q in real}) == 500
    assert real[0].question_id == 1 and real[0].image == "COCO_val2014_000000310196.jpg"


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("Yes, there is a dog.", "yes"),
    ("There is not a dog in the image.", "no"), ("Yes. But no cat.", "yes"),  # only the first sentence
    ("No, there is no car", "no"), ("NO", "yes"), ("Nope", "yes"), ("no,", "no"),
    ("There is no\ndog", "yes"),  # split(' ') keeps "no\ndog" one word, as in LLaVA
])
def test_llava_parser(text: str, expected: str) -> None:
    assert parse_answer(text) == expected


def test_metrics_on_real_files_with_fixed_pattern() -> None:
    # Pattern: every 4th question answered wrongly, the rest correctly.
    for split in POPE_SPLITS:
        qs = load_questions(_official(split))
        preds = [("no" if q.label == "yes" else "Yes, there is.") if i % 4 == 0 else
                 ("Yes" if q.label == "yes" else "No, there is not.") for i, q in enumerate(qs)]
        yes_flipped = sum(1 for i, q in enumerate(qs) if i % 4 == 0 and q.label == "yes")
        no_flipped = sum(1 for i, q in enumerate(qs) if i % 4 == 0 and q.label == "no")
        m = pope_metrics(preds, [q.label for q in qs])
        tp, fn, fp = 1500 - yes_flipped, yes_flipped, no_flipped
        assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (tp, fn, fp, 1500 - no_flipped)
        assert m["accuracy"] == 0.75 and m["n"] == 3000
        assert m["precision"] == pytest.approx(tp / (tp + fp))
        assert m["recall"] == pytest.approx(tp / 1500)
        assert m["yes_ratio"] == pytest.approx((tp + fp) / 3000)


def test_metrics_hand_computed_random_split_counts() -> None:
    qs = load_split("pope_random")
    preds = [("no" if q.label == "yes" else "Yes, there is.") if i % 4 == 0 else q.label for i, q in enumerate(qs)]
    m = pope_metrics(preds, [q.label for q in qs])
    # Counted by hand from the file: the random split alternates yes/no, so questions 1,5,9,... are "yes".
    assert m["fn"] == 750 and m["fp"] == 0
    assert m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.25


def test_metrics_small_hand_example() -> None:
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == 0.6 and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.6
    assert pope_metrics(["no"], ["yes"])["f1"] == 0.0


def test_truncated_line_names_file_and_line(tmp_path: Path) -> None:
    lines = _official("pope_random").read_text().splitlines()[:5]
    lines[3] = lines[3][:40]
    bad = tmp_path / "q.json"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"q\.json:4: invalid JSON"):
        load_questions(bad)


def test_bad_label_and_duplicate_id(tmp_path: Path) -> None:
    f = tmp_path / "q.json"
    f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "t", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"q\.json:1: label"):
        load_questions(f)
    row = json.dumps({"question_id": 1, "image": "a.jpg", "text": "t", "label": "no"})
    f.write_text(row + "\n" + row + "\n")
    with pytest.raises(DataError, match=r"q\.json:2: question_id 1 repeats line 1"):
        load_questions(f)


def test_answers_missing_and_extra(tmp_path: Path) -> None:
    qs = load_split("pope_popular")[:3]
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"question_id": q.question_id, "text": "Yes"}) + "\n" for q in qs))
    assert load_answers(f, qs) == ["Yes"] * 3
    f.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n")
    with pytest.raises(DataError, match="2 questions have no answer"):
        load_answers(f, qs)
    f.write_text("".join(json.dumps({"question_id": i, "text": "Yes"}) + "\n" for i in (99999, qs[0].question_id, 8)))
    with pytest.raises(DataError, match=r"a\.jsonl:1: 2 of 3 answers are for question ids not among the 3 questions "
                                        r"of the question file \(first: question_id 99999\) — pass the questions they "
                                        r"answer: --questions FILE, or --data"):
        load_answers(f, qs)


def test_missing_and_truncated_images(tmp_path: Path) -> None:
    qs = load_split("pope_adversarial")[:12]  # the first two images
    images = sorted({q.image for q in qs})
    Image.new("RGB", (8, 8), "red").save(tmp_path / images[0])
    with pytest.raises(DataError, match=r"coco_pope_adversarial\.json:\d+: image not found"):
        resolve_images(qs, tmp_path)
    kept, paths, skipped = resolve_images(qs, tmp_path, skip_missing=True)
    assert skipped == sum(q.image == images[1] for q in qs) and len(kept) == len(paths) == 12 - skipped
    Image.new("RGB", (64, 64), "blue").save(tmp_path / images[1])
    data = (tmp_path / images[1]).read_bytes()
    (tmp_path / images[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated image"):
        resolve_images(qs, tmp_path)


def test_every_missing_image_is_counted_in_one_error(tmp_path: Path) -> None:
    qs = load_split("pope_adversarial")[:30]
    images = sorted({q.image for q in qs}, key=lambda name: next(i for i, q in enumerate(qs) if q.image == name))
    assert len(images) >= 3
    with pytest.raises(DataError, match=rf"{len(images)} images missing or unreadable under .* \(first: "
                                        rf"{images[0]}, {images[1]}, {images[2]}"):
        resolve_images(qs, tmp_path)


def test_answers_in_the_pope_repository_format(tmp_path: Path) -> None:
    """The POPE repository writes ``{question, answer}`` lines in the question file's order."""
    qs = load_split("pope_adversarial")[:4]
    f = tmp_path / "pope_repo.json"
    f.write_text("".join(json.dumps({"question": q.text, "answer": a}) + "\n"
                         for q, a in zip(qs, ["Yes", "No", "yes.", "no"])))
    assert load_answers(f, qs) == ["Yes", "No", "yes.", "no"]
    f.write_text("".join(json.dumps({"question": q.text, "answer": "Yes"}) + "\n" for q in reversed(qs)))
    with pytest.raises(DataError, match=r"answer 1 is to .* but question 1 of the question file is"):
        load_answers(f, qs)
    f.write_text(json.dumps({"question": qs[0].text, "answer": "Yes"}) + "\n")
    with pytest.raises(DataError, match=r"1 answers in the POPE repository's format .* for 4 questions"):
        load_answers(f, qs)
