"""MME loader (both official layouts), parser and scores against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmeff_lab.evaluation.errors import DataError
from mmeff_lab.evaluation.mme import (
    SUBTASKS,
    load_mme,
    load_results_dir,
    load_template,
    mme_scores,
    parse_prediction,
    write_results,
)


def _image(path: Path) -> None:
    Image.new("RGB", (8, 8), "white").save(path)


def _make_release(root: Path) -> None:
    flat = root / "existence"
    flat.mkdir(parents=True)
    for stem in ("000000006040", "000000018150"):
        _image(flat / f"{stem}.jpg")
        (flat / f"{stem}.txt").write_text("Is there a train? Please answer yes or no.\tYes\n"
                                          "Is there a bed? Please answer yes or no.\tNo\n")
    split = root / "artwork"
    (split / "images").mkdir(parents=True)
    (split / "questions_answers_YN").mkdir()
    _image(split / "images" / "10002.jpg")
    (split / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n\n")


@pytest.mark.parametrize("pred,expected", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"),
                                           ("No.", "no"), ("nope", "no"), ("I think yes", "other"),
                                           (" yes", "yes"), ("Not sure", "no"), ("maybe", "other")])
def test_parser(pred: str, expected: str) -> None:
    assert parse_prediction(pred) == expected


def test_both_layouts_and_score(tmp_path: Path) -> None:
    _make_release(tmp_path / "MME")
    qs, skipped = load_mme(tmp_path / "MME", subtasks=("existence", "artwork"))
    assert skipped == 0 and len(qs) == 6
    assert {q.subtask for q in qs} == {"existence", "artwork"} and qs[0].answer == "yes"
    by_task = {"existence": [q for q in qs if q.subtask == "existence"],
               "artwork": [q for q in qs if q.subtask == "artwork"]}
    out = tmp_path / "results"
    out.mkdir()
    # existence: image 1 both right; image 2 one right, one "other" -> acc 3/4, acc+ 1/2 -> 125.
    write_results(out / "existence.txt", by_task["existence"], ["Yes", "No", "yes", "I cannot tell"])
    # artwork: both wrong -> 0.
    write_results(out / "artwork.txt", by_task["artwork"], ["No", "Yes\tmaybe"])
    scores = mme_scores(load_results_dir(out))
    ex = scores["subtasks"]["existence"]
    assert ex["acc"] == 0.75 and ex["acc_plus"] == 0.5 and ex["score"] == 125.0 and ex["n_other"] == 1
    assert scores["subtasks"]["artwork"]["score"] == 0.0
    # two of 14 subtasks: no total may pretend to be MME's
    assert scores["perception"] is None and scores["cognition"] is None
    assert "code_reasoning" in scores["missing_subtasks"]
    assert scores["totals_missing"]["perception"].startswith("8 of its 10 subtasks missing (count, position")
    assert scores["totals_missing"]["cognition"].startswith("4 of its 4 subtasks missing")
    # a benchmark of two subtasks (a synthetic set) is complete with both: its perception total is their sum
    small = mme_scores(load_results_dir(out), benchmark=("existence", "artwork"))
    assert small["perception"] == 125.0 and small["cognition"] is None
    assert small["totals_missing"] == {"cognition": "not part of this benchmark"}


def test_release_zip_layout_loads(tmp_path: Path) -> None:
    """The release zip unpacks to MME_Benchmark_release_version/MME_Benchmark/<subtask>/."""
    from mmeff_lab.evaluation.tasks import DataSource

    nested = tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark" / "existence"
    nested.mkdir(parents=True)
    data = DataSource("real", tmp_path)
    assert data.mme_root() == nested.parent
    assert data.mme_benchmark == tuple(SUBTASKS)


def test_template_file(tmp_path: Path) -> None:
    f = tmp_path / "count.txt"
    f.write_text("1.jpg\tAre there two dogs? Please answer yes or no.\tYes\n"
                 "1.jpg\tAre there three dogs? Please answer yes or no.\tNo\n")
    assert [q.answer for q in load_template(f)] == ["yes", "no"]
    f.write_text("1.jpg\tAre there two dogs? Please answer yes or no. Yes\n")
    with pytest.raises(DataError, match=r"count\.txt:1: expected image<TAB>question<TAB>answer"):
        load_template(f)


def test_malformed_and_missing(tmp_path: Path) -> None:
    _make_release(tmp_path)
    txt = tmp_path / "existence" / "000000018150.txt"
    txt.write_text("Is there a train? Please answer yes or no.\tYes\nIs there a bed? Please answer yes or no. No\n")
    with pytest.raises(DataError, match=r"000000018150\.txt:2: expected question<TAB>answer"):
        load_mme(tmp_path, subtasks=("existence",))
    txt.write_text("Is there a train?\tMaybe\nIs there a bed?\tNo\n")
    with pytest.raises(DataError, match=r"000000018150\.txt:1: answer must be Yes or No"):
        load_mme(tmp_path, subtasks=("existence",))
    (tmp_path / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(DataError, match=r"10002\.txt: no image 10002"):
        load_mme(tmp_path, subtasks=("artwork",))
    assert load_mme(tmp_path, subtasks=("artwork",), skip_missing=True) == ([], 1)
    res = tmp_path / "res"
    res.mkdir()
    (res / "OCR.txt").write_text("a.jpg\tq1\tYes\tyes\nb.jpg\tq2\tNo\tno\n")
    with pytest.raises(DataError, match=r"OCR\.txt:1: lines 1-2 pair different images"):
        load_results_dir(res)
    (res / "OCR.txt").write_text("a.jpg\tq1\tYes\tyes\n")
    with pytest.raises(DataError, match="need two per image"):
        load_results_dir(res)
