"""``mmeff score``: official metrics on answer files in the official formats, with hand-computed expectations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.reference.synthetic import ensure_benchmarks

runner = CliRunner()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_benchmarks(tmp_path_factory.mktemp("bench"), n_pope_images=2, n_chair_images=2, n_mme_images=2)


def test_chair_real_coco_captions(tmp_path):
    # Real COCO val2014 reference captions (ids 391895, 522418) and one with an invented dog (310196).
    captions = [
        {"image_id": 391895, "caption": "A man with a red helmet on a small moped on a dirt road."},
        {"image_id": 522418, "caption": "A woman wearing a net on her head cutting a cake."},
        {"image_id": "COCO_val2014_000000310196.jpg", "caption": "A person on skis next to a dog."},
    ]
    pred = tmp_path / "captions.jsonl"
    pred.write_text("".join(json.dumps(c) + "\n" for c in captions))
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--data", "coco",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "chair_scores.json").read_text())
    s = doc["sentences"]
    # ground truth (shipped): 391895 {bicycle, motorcycle, person}; 522418 {cake, knife, person, sink};
    # 310196 {person, skis, snowboard}
    assert s[0]["mscoco_generated_words"] == ["person", "motorcycle"] and s[0]["mscoco_hallucinated_words"] == []
    assert s[1]["mscoco_generated_words"] == ["person", "cake"]
    assert s[2]["image_id"] == 310196
    assert s[2]["mscoco_generated_words"] == ["person", "skis", "dog"]
    assert s[2]["mscoco_hallucinated_words"] == [["dog", "dog"]]
    m = doc["overall_metrics"]
    assert m["CHAIRs"] == pytest.approx(1 / 3)
    assert m["CHAIRi"] == pytest.approx(1 / 7)  # 1 hallucinated of 7 object mentions
    assert m["Recall"] == pytest.approx(6 / 10)  # 2+2+2 recalled of 3+4+3 ground-truth objects
    assert "CHAIRs" in result.output


def test_chair_synthetic_ground_truth_and_missing_image(bench, tmp_path):
    gt = json.loads((bench / "chair" / "synth_image_objects.json").read_text())
    image_id, objects = next(iter(gt.items()))
    pred = tmp_path / "c.json"
    pred.write_text(json.dumps([{"image_id": int(image_id), "caption": f"There is a {objects[0]}."}]))
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--data", str(bench)])
    assert result.exit_code == 0, result.output
    pred.write_text(json.dumps([{"image_id": 12345, "caption": "A cat."},
                                {"image_id": int(image_id), "caption": "A cat."},
                                {"image_id": 391895, "caption": "A man."}]))
    result = runner.invoke(app, ["score", "chair", "--predictions", str(pred), "--data", str(bench)])
    assert result.exit_code == 2 and "2 of the 3 captioned images have no ground truth in the synthetic benchmark" \
        in result.output and "(first: image id 12345) — they are COCO image ids: pass --data coco" in result.output


def test_pope_answers(bench, tmp_path):
    questions = [json.loads(x) for x in (bench / "pope" / "coco_pope_random.json").read_text().splitlines()]
    pred = tmp_path / "answers.jsonl"
    pred.write_text("".join(json.dumps({"question_id": q["question_id"], "text": "Yes, there is."}) + "\n"
                            for q in questions))
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", str(bench),
                                 "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "pope_scores.json").read_text())
    assert m["n"] == len(questions) == 12
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert m["f1"] == pytest.approx(2 / 3)
    # an explicit question file works too; an unanswered question is an error naming the answer file
    pred.write_text(json.dumps({"question_id": 1, "text": "No"}) + "\n")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred),
                                 "--questions", str(bench / "pope" / "coco_pope_random.json")])
    assert result.exit_code == 2 and "11 questions have no answer" in result.output and str(pred) in result.output


def test_mme_results(bench, tmp_path):
    template = (bench / "mme" / "eval_tool" / "Your_Results" / "existence.txt").read_text().splitlines()
    assert len(template) == 4  # two images, "Yes" question first
    preds = ["Yes", "No", "Yes", "Yes"]  # image 1 both right, image 2 one right
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "existence.txt").write_text("".join(f"{t}\t{p}\n" for t, p in zip(template, preds)))
    result = runner.invoke(app, ["score", "mme", "--predictions", str(tmp_path / "res"), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "mme_scores.json").read_text())
    assert m["subtasks"]["existence"]["acc"] == 0.75 and m["subtasks"]["existence"]["acc_plus"] == 0.5
    # synthetic images (synth_*): totals over the synthetic benchmark's 4 perception subtasks, as mmeff eval does;
    # one of them present: no total
    assert m["benchmark"] == "synthetic" and m["perception"] is None and m["cognition"] is None
    assert "note: no MME perception total: 3 of its 4 subtasks missing (count, position," in result.output
    assert "note: no MME cognition total: not part of this benchmark" in result.output
    bad = tmp_path / "count.txt"
    bad.write_text("a.jpg\tIs it?\tYes\n")
    result = runner.invoke(app, ["score", "mme", "--predictions", str(bad)])
    assert result.exit_code == 2 and f"{bad}:1" in result.output


def test_unknown_benchmark(tmp_path):
    result = runner.invoke(app, ["score", "vqa", "--predictions", str(tmp_path / "x")])
    assert result.exit_code == 2 and "pope, chair, mme" in result.output


def test_pope_non_answers_are_counted(bench, tmp_path):
    questions = [json.loads(x) for x in (bench / "pope" / "coco_pope_random.json").read_text().splitlines()]
    texts = ["maybe", "42", "", "Yes.", "No, there is not.", "I cannot tell"] * 2
    pred = tmp_path / "answers.jsonl"
    pred.write_text("".join(json.dumps({"question_id": q["question_id"], "text": t}) + "\n"
                            for q, t in zip(questions, texts)))
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", str(bench),
                                 "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "pope_scores.json").read_text())
    assert m["non_yes_no"] == 8 and m["yes_ratio"] == pytest.approx(10 / 12)  # the official rule still holds
    assert "8 of 12 answers say neither yes nor no" in result.output


def _answers(path: Path, questions: list, text: str = "Yes", **quote: str) -> Path:
    """{question_id, text} lines; ``quote`` adds each question's text (``prompt="text"``, as LLaVA's model_vqa
    writes it, with its suffix) or image (``image="image"``)."""
    extra = {"prompt": lambda q: q.text + "\nAnswer the question using a single word or phrase.",
             "image": lambda q: q.image}
    path.write_text("".join(json.dumps({"question_id": q.question_id, "text": text,
                                        **{k: extra[k](q) for k in quote}}) + "\n" for q in questions))
    return path


def test_pope_benchmark_is_inferred_from_quoted_questions_or_images(tmp_path):
    """Without --data, answers that quote their question (LLaVA's ``prompt``) or name their image are scored
    against the benchmark those are of — the shipped COCO files here, no synthetic set generated."""
    from mmeff_lab.evaluation import pope

    qs = pope.load_split("pope_random")
    for quote in ("prompt", "image"):
        pred = _answers(tmp_path / f"answers_{quote}.jsonl", qs, **{quote: quote})
        result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--output", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "pope_scores.json").read_text())["n"] == len(qs) == 3000
    # the same answers quoted against another split's questions: refused, not scored against its labels
    pred = _answers(tmp_path / "answers.jsonl", qs, prompt="prompt")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--questions", "adversarial"])
    assert result.exit_code == 2 and "neither those of the COCO pope_adversarial file nor the synthetic" \
        in result.output


def test_pope_ids_alone_do_not_pick_a_benchmark(tmp_path):
    """ids 1..3000 number the COCO questions and the synthetic benchmark's alike: bare ids name the flag to pass;
    LLaVA's 10000001.. numbering names its question file; the count of unknown ids and an example are given."""
    from mmeff_lab.evaluation import pope

    qs = pope.load_split("pope_random")
    pred = _answers(tmp_path / "answers.jsonl", qs)
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred)])
    assert result.exit_code == 2 and "carry only question ids" in result.output
    assert "pass --data coco for answers about COCO val2014 images, --data synthetic" in result.output
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", "coco",
                                 "--output", str(tmp_path)])
    assert result.exit_code == 0 and json.loads((tmp_path / "pope_scores.json").read_text())["n"] == 3000
    # LLaVA's answer file (adversarial 1..3000, random 10000001..) without its question file
    lines = pred.read_text() + "".join(json.dumps({"question_id": 10_000_000 + q.question_id, "text": "No"}) + "\n"
                                       for q in qs)
    pred.write_text(lines)
    for data in ([], ["--data", "coco"]):
        result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), *data])
        assert result.exit_code == 2, result.output
        assert (f"{pred}:3001: 3000 of 6000 answers are for question ids not among the 3000 questions of the "
                "shipped COCO pope_random file (first: question_id 10000001)") in result.output
        assert "pass --questions llava_pope_test.jsonl" in result.output


def test_synthetic_and_coco_answers_are_never_crossed(bench, tmp_path, monkeypatch):
    """Answers quoting the synthetic benchmark's questions: inferred as synthetic without --data (its generation
    stubbed with the small test set), refused against COCO; COCO answers refused against the synthetic set."""
    import mmeff_lab.reference.synthetic as synthetic
    from mmeff_lab.evaluation import pope

    monkeypatch.setattr(synthetic, "ensure_benchmarks", lambda *a, **k: bench)
    synth = pope.load_questions(bench / "pope" / "coco_pope_random.json")
    pred = _answers(tmp_path / "synthetic.jsonl", synth, prompt="prompt")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--output", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", str(bench),
                                 "--output", str(tmp_path / "given")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "auto" / "pope_scores.json").read_text() == (tmp_path / "given" / "pope_scores.json").read_text()
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", "coco"])
    assert result.exit_code == 2, result.output
    assert (f"{pred}:1: 12 of 12 answers are to other questions than those of the shipped COCO pope_random file "
            "(first: the answer asks 'Is there") in result.output
    coco = pope.load_split("pope_random")[: len(synth)]  # the same ids 1..12, COCO's questions
    pred = _answers(tmp_path / "coco.jsonl", coco, image="image")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(pred), "--data", str(bench)])
    assert result.exit_code == 2 and "12 of 12 answers are to other questions" in result.output
    assert "is about COCO_val2014_000000310196.jpg" in result.output


def test_chair_benchmark_is_inferred_from_the_image_ids(bench, tmp_path, monkeypatch):
    """COCO ids (< 1e9) score against the shipped COCO ground truth, synthetic ones (scene seeds >= 1e9) against the
    synthetic benchmark; a mix, or ids the ground truth lacks, are one error counting them."""
    import mmeff_lab.reference.synthetic as synthetic

    monkeypatch.setattr(synthetic, "ensure_benchmarks", lambda *a, **k: bench)
    synth_id = int(next(iter(json.loads((bench / "chair" / "synth_image_objects.json").read_text()))))
    caps = tmp_path / "captions.jsonl"
    caps.write_text(json.dumps({"image_id": 391895, "caption": "A man on a moped."}) + "\n")
    result = runner.invoke(app, ["score", "chair", "--predictions", str(caps)])  # the README's command, no --data
    assert result.exit_code == 0, result.output
    caps.write_text(json.dumps({"image_id": f"synth_{synth_id:012d}.jpg", "caption": "A cat."}) + "\n")
    result = runner.invoke(app, ["score", "chair", "--predictions", str(caps), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "chair_scores.json").read_text())["sentences"][0]["image_id"] == synth_id
    result = runner.invoke(app, ["score", "chair", "--predictions", str(caps), "--data", "coco"])
    assert result.exit_code == 2 and (f"1 of the 1 captioned images have no ground truth in the shipped COCO 2014 "
                                      f"ground truth (first: image id {synth_id}) — they are synthetic-benchmark "
                                      "image ids: pass --data synthetic") in result.output
    caps.write_text(json.dumps({"image_id": synth_id, "caption": "A cat."}) + "\n"
                    + json.dumps({"image_id": 391895, "caption": "A man."}) + "\n")
    result = runner.invoke(app, ["score", "chair", "--predictions", str(caps)])
    assert result.exit_code == 2 and "mix COCO image ids (e.g. 391895) and synthetic-benchmark ones" in result.output
    absent = synth_id + 5_000_000  # a synthetic id, not in the benchmark
    caps.write_text(json.dumps({"image_id": absent, "caption": "A cat."}) + "\n")
    result = runner.invoke(app, ["score", "chair", "--predictions", str(caps)])
    assert result.exit_code == 2 and f"(first: image id {absent})" in result.output


def test_mme_results_mixing_benchmarks_are_refused(bench, tmp_path):
    template = (bench / "mme" / "eval_tool" / "Your_Results" / "existence.txt").read_text().splitlines()
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "existence.txt").write_text("".join(f"{t}\tYes\n" for t in template))
    (tmp_path / "res" / "OCR.txt").write_text("1.jpg\tIs it?\tYes\tYes\n1.jpg\tIs it not?\tNo\tNo\n")
    result = runner.invoke(app, ["score", "mme", "--predictions", str(tmp_path / "res")])
    assert result.exit_code == 2 and "mix synthetic-benchmark images (synth_*) and others" in result.output


def test_llava_answer_and_question_files(tmp_path):
    """LLaVA's POPE files: ids 1.. (adversarial), 10000001.. (random), 20000001.. (popular); the question file
    carries the split as ``category``; eval_pope.py pairs answers and labels in order per category."""
    from mmeff_lab.evaluation import pope

    qfile, afile = tmp_path / "llava_pope_test.jsonl", tmp_path / "answers.jsonl"
    qlines, alines, want = [], [], {}
    for split, base in (("adversarial", 0), ("random", 10000000), ("popular", 20000000)):
        qs = pope.load_split(f"pope_{split}")
        answers = ["Yes" if i % 3 else "No" for i in range(len(qs))]
        want[f"pope_{split}"] = pope.pope_metrics(answers, [q.label for q in qs])
        for i, (q, a) in enumerate(zip(qs, answers)):
            qlines.append({"question_id": base + i + 1, "image": q.image, "text": q.text, "category": split})
            alines.append({"question_id": base + i + 1, "prompt": q.text, "text": a})
    qfile.write_text("".join(json.dumps(x) + "\n" for x in qlines))
    afile.write_text("".join(json.dumps(x) + "\n" for x in alines))
    result = runner.invoke(app, ["score", "pope", "--predictions", str(afile), "--questions", str(qfile),
                                 "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "pope_scores.json").read_text())["splits"]
    assert got.keys() == want.keys()
    for split in want:
        assert got[split] == pytest.approx(want[split])
    other = next(i for i, x in enumerate(qlines) if x["image"] != qlines[0]["image"])
    qlines[0]["image"], qlines[other]["image"] = qlines[other]["image"], qlines[0]["image"]  # misaligned: refused
    qfile.write_text("".join(json.dumps(x) + "\n" for x in qlines))
    result = runner.invoke(app, ["score", "pope", "--predictions", str(afile), "--questions", str(qfile)])
    assert result.exit_code == 2 and "answer 1 (pope_adversarial) is about" in result.output
