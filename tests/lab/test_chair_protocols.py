"""CHAIR protocols (original / opera / wordnet), ground truth from COCO files, image sets, and their recording.

Every expected value here was worked out by hand from the official rules -- pattern.en.singularize's rule
tables as the standalone CHAIR script calls them, OPERA's tag -> WordNet mapping, the script's double-word
and synonym rules -- and is written out, never computed by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.evaluation.chair import (
    PROTOCOLS,
    caption_to_words,
    evaluate_chair,
    ground_truth_from_coco,
    image_set,
    load_image_ids,
    normaliser,
)
from mmeff_lab.evaluation.chair_words import ProtocolUnavailable, singularize, wordnet_pos
from mmeff_lab.evaluation.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures_eval"
runner = CliRunner()

# word -> pattern.en.singularize(word), each derived by hand from pattern's rules (which rule fires noted).
SINGULAR = {
    "bus": "bu",            # plain -s rule: the script never sees "bus"
    "buses": "bus",         # (bus)es
    "ties": "ty",           # [^aeiouy]ies -> y ("^tie" in the -ie list is a literal caret)
    "pies": "py",
    "glass": "glas",        # -s rule: hence the script's "wine glas" double word
    "glasses": "glass",     # (x|ch|ss|sh)es
    "vases": "vase",
    "men": "man", "women": "woman", "policemen": "policeman",  # irregular "men" as an ending
    "children": "child", "people": "person", "geese": "goose", "teeth": "tooth", "feet": "foot",
    "oxen": "ox", "kine": "cow",
    "your": "ymy",          # irregular "our" as an ending
    "taxes": "taxe",        # irregular "axes" as an ending
    "knives": "knife", "wives": "wife",  # ([nlw]i)ves
    "calves": "calf", "wolves": "wolf",  # ([aeo]l)ves
    "shelves": "shelve",    # irregular "helves" as an ending comes first
    "leaves": "leaf",
    "mice": "mouse",        # ([m|l])ice
    "sheep": "sheep", "skis": "ski", "puppies": "puppy", "giraffes": "giraffe",
    "dishes": "dish", "benches": "bench", "boxes": "box",
    "tomatoes": "tomato", "shoes": "shoe",
    "indices": "index", "crises": "crisis", "analyses": "analysis", "theses": "thesis", "bases": "basis",
    "spaghetti": "spaghettus",  # ([octop|vir])i is a character class
    "scissors": "scissors", "series": "series", "species": "species", "luggage": "luggage",
    "ears": "ears",         # the tail of uninflected "shears"
    "is": "is",             # the tail of "debris"
    "this": "thi", "was": "wa", "has": "ha",
    "doggies": "doggies", "cookies": "cookies",  # the -ie list returns the plural as it is
    "dogs'": "dog's", "'": "'s", "'s": "'",
    "mothers-in-law": "mother-in-law", "t-shirts": "t-shirt",
    "": "",
}


def test_singularize_is_patterns() -> None:
    assert {w: singularize(w) for w in SINGULAR} == SINGULAR


# Captions with hand-computed words under ``original`` and a ground truth of our own.
CAPTIONS = [
    (1, "Two buses and three men wear ties near the glasses."),
    (2, "A bus, two vases, some doggies and the cookies on a toilet seat."),
    (3, "A baby elephant next to hot dogs, teddy bears and motor bikes on train tracks."),
    (4, "Children, women and people with knives, mice and geese by the benches."),
    (5, "A skier holds skis, scissors and luggage beside oxen."),
]
GT = {1: frozenset({"bus", "tie"}), 2: frozenset({"vase", "toilet", "dog"}), 3: frozenset({"elephant", "train"}),
      4: frozenset({"person", "knife", "bird"}), 5: frozenset({"person", "skis", "cow"})}


def test_original_words_per_caption() -> None:
    r = evaluate_chair(CAPTIONS, GT)  # original is the default
    s = r.sentences
    assert s[0]["words"] == ["two", "bus", "and", "three", "man", "wear", "ty", "near", "the", "glass", "."]
    assert s[0]["mscoco_generated_words"] == ["bus", "person"]
    assert s[0]["mscoco_hallucinated_words"] == [("man", "person")] and s[0]["hallucination_idxs"] == [4]
    # "bus" -> "bu", "doggies" kept as is: neither is an object; "toilet seat" -> toilet.
    assert s[1]["words"] == ["a", "bu", ",", "two", "vase", ",", "some", "doggies", "and", "the", "cookies", "on",
                             "a", "toilet", "."]
    assert s[1]["mscoco_generated_words"] == ["vase", "toilet"] and s[1]["mscoco_hallucinated_words"] == []
    # baby X -> X; "motor bike" merges but matches no synonym (" motor bike"); "train track" is no train.
    assert s[2]["words"] == ["a", "elephant", "next", "to", "hot dog", ",", "teddy bear", "and", "motor bike", "on",
                             "train track", "."]
    assert s[2]["mscoco_generated_words"] == ["elephant", "hot dog", "teddy bear"]
    assert s[2]["hallucination_idxs"] == [5, 8]  # token positions before merging, as the script keeps them
    assert [w for w, _ in s[3]["mscoco_hallucinated_words"]] == ["mouse", "bench"]
    cw = caption_to_words(CAPTIONS[3][1])
    assert cw.words == ["child", "woman", "person", "knife", "mouse", "goose", "bench"]
    assert cw.node_words == ["person", "person", "person", "knife", "mouse", "bird", "bench"]
    cw = caption_to_words(CAPTIONS[4][1])
    assert cw.words == ["skier", "ski", "scissors", "luggage", "ox"]
    assert cw.node_words == ["person", "skis", "scissors", "suitcase", "cow"]
    assert s[4]["mscoco_hallucinated_words"] == [("scissors", "scissors"), ("luggage", "suitcase")]
    # hallucinating captions 1, 3, 4, 5; hallucinated 1+0+2+2+2 of 2+2+3+7+5 mentions;
    # recalled 1+2+1+3+3 of 2+3+2+3+3 objects; 11, 15, 12, 15, 11 words.
    assert r.metrics == {"CHAIRs": 4 / 5, "CHAIRi": 7 / 19, "Recall": 10 / 13, "Len": 64 / 5, "n": 5,
                         "n_skipped": 0}


def test_wordnet_protocol_differs_where_the_issue_says() -> None:
    # WordNet noun lemmas: "bus", "ties" count, "vases" (-> "vas") and "men" (a lemma itself) do not.
    cw = caption_to_words(CAPTIONS[0][1], protocol="wordnet")
    assert cw.words == ["bus", "tie"]  # buses -> bus, men -> men (unmatched), ties -> tie
    assert caption_to_words("A bus and two vases.", protocol="wordnet").node_words == ["bus"]
    assert caption_to_words("A bus and two vases.").node_words == ["vase"]


def test_opera_rules_with_a_given_tagger() -> None:
    """OPERA's pipeline on hand-given Penn tags: the tag picks the WordNet part of speech (verbs lemmatised as
    verbs: "seated" -> seat = chair, "skiing" -> ski = skis); untagged classes fall back to noun."""
    tags = {"two": "CD", "men": "NNS", "are": "VBP", "seated": "VBN", "near": "IN", "skiing": "VBG",
            "people": "NNS", "and": "CC", "bowls": "NNS", "quickly": "RB", "red": "JJ", ".": "."}
    # WordNet lemmas of these (word, pos) pairs, as nltk's lemmatizer gives them.
    lemmas = {("men", "n"): "men", ("are", "v"): "be", ("seated", "v"): "seat", ("skiing", "v"): "ski",
              ("bowls", "n"): "bowl", ("quickly", "r"): "quickly", ("red", "a"): "red"}
    calls: list[tuple[str, str]] = []

    def lemmatize(word: str, pos: str) -> str:
        calls.append((word, pos))
        return lemmas.get((word, pos), word)

    tools = (lambda tokens: [(t, tags[t]) for t in tokens], lemmatize)
    cw = caption_to_words("Two men are seated near skiing people and bowls quickly red.",
                          protocol=normaliser("opera", opera_tools=tools))
    assert cw.words == ["seat", "ski", "people", "bowl"]  # "men" is its own noun lemma: not "man"
    assert cw.node_words == ["chair", "skis", "person", "bowl"]
    assert calls == [("two", "n"), ("men", "n"), ("are", "v"), ("seated", "v"), ("near", "n"), ("skiing", "v"),
                     ("people", "n"), ("and", "n"), ("bowls", "n"), ("quickly", "r"), ("red", "a"), (".", "n")]
    assert [wordnet_pos(t) for t in ("JJR", "VBZ", "NNP", "RBS", "PRP", "DT")] == ["a", "v", "n", "r", "n", "n"]


def test_opera_without_nltk_data_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk

    def find(resource: str) -> str:
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", find)
    with pytest.raises(ProtocolUnavailable, match=r"averaged_perceptron_tagger_eng and wordnet.*--protocol original"):
        normaliser("opera")
    with pytest.raises(Exception, match=r"unknown CHAIR protocol 'singular'; valid: original, opera, wordnet"):
        normaliser("singular")
    assert list(PROTOCOLS) == ["original", "opera", "wordnet"]


def test_opera_with_real_nltk_data_when_installed() -> None:
    try:
        normaliser("opera")
    except ProtocolUnavailable:
        pytest.skip("nltk's averaged_perceptron_tagger_eng / wordnet data not installed (nltk downloader only)")
    cw = caption_to_words("Two dogs are sitting on benches.", protocol="opera")
    assert cw.node_words == ["dog", "bench"]


def test_ground_truth_from_coco_fixture_is_the_official_sets() -> None:
    d = FIXTURES / "chair_coco"
    gt = ground_truth_from_coco([d / "instances_val2014.json"], [d / "captions_val2014.json"])
    # 1: instances person, tie; "buses" -> bus, "wine glasses" -> wine glass; "a bus with ties" -> bu, ty: none.
    # 2: instance bus; women -> person, hot dogs -> hot dog, doggies (kept) none, toilet seat -> toilet;
    #    teddy bear; "dining" is no object, "table" -> dining table. 3: vase ("flowers" is no synonym). 4: none.
    assert gt == {1: frozenset({"person", "tie", "bus", "wine glass"}),
                  2: frozenset({"bus", "person", "hot dog", "toilet", "teddy bear", "dining table"}),
                  3: frozenset({"vase"}), 4: frozenset()}
    wn = ground_truth_from_coco([d / "instances_val2014.json"], [d / "captions_val2014.json"], protocol="wordnet")
    assert wn[3] == frozenset()  # "vases" -> "vas" under WordNet
    assert wn[1] == gt[1]


def test_image_sets(tmp_path: Path) -> None:
    name, ids = image_set("pope")
    assert name == "pope" and len(ids) == 500 == len(set(ids))
    f = tmp_path / "ids.txt"
    f.write_text("1\nCOCO_val2014_000000000003.jpg\n\n1\n")
    assert load_image_ids(f) == [1, 3]
    f.write_text("[5, 2]")
    assert image_set(f) == (str(f), [5, 2])
    f.write_text("cat\n")
    with pytest.raises(DataError, match="neither an integer nor a COCO file name"):
        load_image_ids(f)
    with pytest.raises(DataError, match="neither 'pope' nor a file"):
        image_set(tmp_path / "missing.txt")


def test_score_cli_protocol_images_and_annotations(tmp_path: Path) -> None:
    pred = tmp_path / "captions.jsonl"
    pred.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in [
        (1, "A man with buses and ties."), (2, "Two vases and a bus."), (3, "Vases.")]))
    ann = FIXTURES / "chair_coco"
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--annotations", str(ann),
                                 "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "o" / "chair_scores.json").read_text())
    assert doc["protocol"] == "original" and doc["image_set"] == {"name": "all", "n_images": 3}
    # 1: man, bus (ties -> ty) both in gt; 2: vase hallucinated (gt 2 has no vase), "bus" -> bu; 3: vase.
    assert [s["mscoco_generated_words"] for s in doc["sentences"]] == [["person", "bus"], ["vase"], ["vase"]]
    assert doc["overall_metrics"]["CHAIRs"] == pytest.approx(1 / 3)
    assert "original" in result.output
    ids = tmp_path / "ids.txt"
    ids.write_text("3\n2\n9\n")
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--annotations", str(ann),
                                 "--protocol", "wordnet", "--images", str(ids), "--output", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "w" / "chair_scores.json").read_text())
    assert doc["protocol"] == "wordnet"
    assert doc["image_set"] == {"name": str(ids), "n_images": 3, "n_captions_outside": 1,
                                "n_images_without_caption": 1}
    # wordnet: "vases" -> vas (nothing), "bus" -> bus (in gt 2); gt 3 is empty under wordnet.
    assert [s["mscoco_generated_words"] for s in doc["sentences"]] == [["bus"], []]
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--annotations", str(ann),
                                 "--protocol", "pattern"])
    assert result.exit_code == 2 and "unknown CHAIR protocol 'pattern'" in result.output
    assert "Traceback" not in result.output


def test_eval_records_protocol_and_image_set(tiny_model_dir, tmp_path: Path) -> None:
    from mmeff_lab.reference.synthetic import ensure_benchmarks

    bench = ensure_benchmarks(tmp_path / "bench", n_pope_images=2, n_chair_images=3, n_mme_images=1)
    gt = json.loads((bench / "chair" / "synth_image_objects.json").read_text())
    ids = tmp_path / "ids.txt"
    ids.write_text(sorted(gt)[-1] + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llava")), "--preset", "none", "--tasks",
                                 "chair", "--data", str(bench), "--chair-max-new-tokens", "4", "--chair-protocol",
                                 "wordnet", "--chair-images", str(ids), "--n-boot", "10", "--no-progress",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["chair"] == {"protocol": "wordnet", "protocol_is": PROTOCOLS["wordnet"], "images": str(ids),
                            "n_images": 1}
    assert res["runs"][0]["tasks"]["chair"]["n"] == 1
    assert "CHAIR protocol `wordnet`" in (out / "results.md").read_text()
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("llava")), "--tasks", "chair", "--data",
                                 str(bench), "--chair-protocol", "opera2", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown CHAIR protocol 'opera2'" in result.output
