"""``mmeff score pope|mme`` on lmms-eval's logged samples (``samples_<task>.jsonl``): both layouts lmms-eval has
written, scored with the official parsers, equal to the same answers in the native formats; mixed files refused.
The fixtures are described in ``fixtures_lmms_samples/README.md``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.evaluation import pope

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures_lmms_samples"
POPE_07 = FIXTURES / "20250301_101500_samples_pope_random.jsonl"
POPE_OLD = FIXTURES / "samples_pope_2024-09-03T12-34-56.123456.jsonl"
MME_07 = FIXTURES / "20250301_101500_samples_mme.jsonl"
MME_OLD = FIXTURES / "samples_mme_2024-09-03T12-34-56.123456.jsonl"
SUFFIX = "\nAnswer the question using a single word or phrase."


def _score(benchmark: str, *args: str, out: Path) -> dict:
    result = runner.invoke(app, ["score", benchmark, *args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / f"{benchmark}_scores.json").read_text())


def _native_pope(tmp_path: Path, questions: list[pope.Question], answers: list[str]) -> dict:
    """The same answers as ``{question_id, text}`` lines against a question file of the same questions."""
    qfile, afile = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": q.question_id, "image": q.image, "text": q.text,
                                         "label": q.label}) + "\n" for q in questions))
    afile.write_text("".join(json.dumps({"question_id": q.question_id, "text": a}) + "\n"
                             for q, a in zip(questions, answers)))
    return _score("pope", "--predictions", str(afile), "--questions", str(qfile), out=tmp_path / "native")


def test_pope_samples_of_lmms_eval_07(tmp_path):
    """0.7 layout (no doc): answers from filtered_resps, labels from target; split from the task in the name."""
    got = _score("pope", "--predictions", str(POPE_07), out=tmp_path)
    # Yes / No / "Yes, there is ..." / "There is no sandwich." / "no" / "I cannot tell" against yes,no,yes,no,yes,no:
    # TP 2 (q1, q3), TN 2 (q2, q4), FN 1 (q5), FP 1 (q6: no yes/no word, the official rule says yes)
    assert (got["format"], got["task"], got["split"]) == ("lmms-eval samples", "pope_random", "pope_random")
    assert (got["tp"], got["tn"], got["fn"], got["fp"], got["n"], got["non_yes_no"]) == (2, 2, 1, 1, 6, 1)
    assert got["accuracy"] == pytest.approx(4 / 6) and got["f1"] == pytest.approx(2 / 3)
    assert got["yes_ratio"] == 0.5
    # lmms-eval's own pope_accuracy (exact "yes"/"no") would be 2/6: ours is the official parser, not its aggregation
    logged = [json.loads(x)["pope_accuracy"]["score"] for x in POPE_07.read_text().splitlines()]
    assert sum(logged) == 2
    samples = [json.loads(x) for x in POPE_07.read_text().splitlines()]
    qs = pope.load_split("pope_random")[:6]
    answers = [s["filtered_resps"] for s in samples]
    native = _native_pope(tmp_path, qs, answers)
    assert {k: got[k] for k in native} == native


def test_pope_samples_with_docs_give_eval_pope_splits(tmp_path):
    """The older layout keeps the dataset row: its category splits the metrics as LLaVA's eval_pope.py does."""
    got = _score("pope", "--predictions", str(POPE_OLD), out=tmp_path)
    assert got["task"] == "pope" and set(got["splits"]) == {"pope_adversarial", "pope_popular", "pope_random"}
    adv, popular, rnd = (got["splits"][f"pope_{s}"] for s in ("adversarial", "popular", "random"))
    # adversarial: Yes/Yes vs yes/no; popular: No/No vs yes/no; random: "Yes." / "No, there is no car." vs yes/no
    assert (adv["tp"], adv["fp"], adv["accuracy"], adv["f1"]) == (1, 1, 0.5, pytest.approx(2 / 3))
    assert (popular["tn"], popular["fn"], popular["precision"], popular["f1"]) == (1, 1, 0.0, 0.0)
    assert (rnd["accuracy"], rnd["f1"], rnd["yes_ratio"]) == (1.0, 1.0, 0.5)
    for split, metrics in got["splits"].items():
        rows = [json.loads(x) for x in POPE_OLD.read_text().splitlines()]
        rows = [r for r in rows if f"pope_{r['doc']['category']}" == split]
        by_id = {q.question_id: q for q in pope.load_split(split)}
        native = _native_pope(tmp_path, [by_id[int(r["doc"]["question_id"])] for r in rows],
                              [r["filtered_resps"][0] for r in rows])
        assert metrics == native


def _old_layout_line(doc_id: int, q: pope.Question, split: str, answer: str) -> str:
    """A POPE sample as the older lmms-eval writes it (see fixtures_lmms_samples/README.md)."""
    doc = {"id": str(doc_id), "question_id": str(q.question_id), "question": q.text, "answer": q.label,
           "category": split}
    payload = {"question_id": doc["question_id"], "score": float(answer.lower().strip() == q.label),
               "prediction": answer.lower().strip(), "ground_truth": q.label}
    return json.dumps({"doc_id": doc_id, "doc": doc, "target": q.label,
                       "arguments": {"gen_args_0": {"arg_0": q.text + SUFFIX, "arg_1": {"max_new_tokens": 128}}},
                       "resps": [[answer]], "filtered_resps": [answer],
                       **{f"pope_{m}": payload for m in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")}})


def test_a_whole_split_equals_the_native_answer_file(tmp_path):
    """3000 logged samples of the random split score exactly as the same answers as {question_id, text} against the
    shipped COCO split (--data coco)."""
    qs = pope.load_split("pope_random")
    answers = [("Yes", "No", "Yes, there is.", "There is not a dog.", "maybe")[i % 5] for i in range(len(qs))]
    samples = tmp_path / "20250301_101500_samples_pope_random.jsonl"
    samples.write_text("".join(_old_layout_line(i, q, "random", a) + "\n" for i, (q, a) in enumerate(zip(qs, answers))))
    got = _score("pope", "--predictions", str(samples), out=tmp_path / "lmms")
    native_file = tmp_path / "answers.jsonl"
    native_file.write_text("".join(json.dumps({"question_id": q.question_id, "text": a}) + "\n"
                                   for q, a in zip(qs, answers)))
    native = _score("pope", "--predictions", str(native_file), "--data", "coco", out=tmp_path / "native")
    assert native["n"] == 3000 and {k: got[k] for k in native} == native


@pytest.mark.parametrize("path", [MME_07, MME_OLD], ids=["lmms-eval-0.7", "with-doc"])
def test_mme_samples_equal_the_result_files(path, tmp_path):
    got = _score("mme", "--predictions", str(path), out=tmp_path)
    # existence: 3 of 4 right, 1 of 2 images both right -> 75 + 50; code_reasoning likewise ("The code prints 3."
    # is neither yes nor no in its first four characters: wrong, counted as unparsed)
    assert got["subtasks"]["existence"]["score"] == 125.0 and got["subtasks"]["code_reasoning"]["score"] == 125.0
    assert got["subtasks"]["code_reasoning"]["n_other"] == 1
    assert got["perception"] is None and got["cognition"] is None and got["format"] == "lmms-eval samples"
    # the same answers as the eval tool's result files: <subtask>.txt of image, question, answer, prediction
    results = tmp_path / "results"
    results.mkdir()
    by_subtask: dict[str, list[str]] = {}
    for line in MME_OLD.read_text().splitlines():
        s = json.loads(line)
        doc = s["doc"]
        image = doc["question_id"].split("/")[-1]
        by_subtask.setdefault(doc["category"], []).append(
            f"{image}\t{doc['question']}\t{doc['answer']}\t{s['filtered_resps'][0]}\n")
    for subtask, lines in by_subtask.items():
        (results / f"{subtask}.txt").write_text("".join(lines))
    native = _score("mme", "--predictions", str(results), out=tmp_path / "native")
    assert native["benchmark"] == "MME"
    assert {k: got[k] for k in native if k != "benchmark"} == {k: v for k, v in native.items() if k != "benchmark"}


def test_mixed_and_unknown_files_are_one_error(tmp_path):
    samples = POPE_07.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(samples[0] + "\n" + json.dumps({"question_id": 2, "text": "No"}) + "\n")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(mixed)])
    assert result.exit_code == 2 and f"{mixed}:2: a line in the ids format among lmms-eval lines" in result.output
    mixed.write_text(MME_07.read_text().splitlines()[0] + "\n" + json.dumps({"image": "a.jpg"}) + "\n")
    result = runner.invoke(app, ["score", "mme", "--predictions", str(mixed)])
    assert result.exit_code == 2 and f"{mixed}:2: not an lmms-eval logged sample" in result.output
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"id": 1, "response": "Yes"}) + "\n")
    result = runner.invoke(app, ["score", "pope", "--predictions", str(unknown)])
    assert result.exit_code == 2 and "no POPE answer format has the keys ['id', 'response']" in result.output
    assert "lmms-eval's logged samples" in result.output  # the accepted formats are listed
    result = runner.invoke(app, ["score", "mme", "--predictions", str(unknown)])
    assert result.exit_code == 2 and "MME predictions are lmms-eval's logged samples" in result.output
    # one benchmark's samples given to the other; samples with --questions (they carry their own)
    result = runner.invoke(app, ["score", "mme", "--predictions", str(POPE_OLD)])
    assert result.exit_code == 2 and "sample of pope, not mme (score it with mmeff score pope)" in result.output
    result = runner.invoke(app, ["score", "pope", "--predictions", str(POPE_07), "--questions", "random"])
    assert result.exit_code == 2 and "drop --questions / --data" in result.output


def test_mme_samples_must_pair_two_questions_per_image(tmp_path):
    lines = MME_07.read_text().splitlines()
    path = tmp_path / "samples_mme.jsonl"
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # one question of existence/000000008277.jpg dropped
    result = runner.invoke(app, ["score", "mme", "--predictions", str(path)])
    assert result.exit_code == 2 and "existence/000000008277.jpg has 1 questions in the samples" in result.output
    path.write_text("\n".join(lines + lines[:1]) + "\n")  # a repeated doc (two runs appended)
    result = runner.invoke(app, ["score", "mme", "--predictions", str(path)])
    assert result.exit_code == 2 and f"{path}:9: doc_id 0 repeats line 1" in result.output


def test_lmms_eval_writes_what_we_read(tmp_path):
    """With lmms-eval installed: samples written by its own evaluator and tracker (the 0.7 layout) for the whole
    random split score as the native answer file does."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]')")
    from lmms_eval.api.instance import Instance
    from lmms_eval.evaluator import _process_document_results
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.tasks.pope import utils as pope_task

    task = SimpleNamespace(process_results=pope_task.pope_process_results, doc_to_target=lambda d: d["answer"],
                           config=SimpleNamespace(repeats=1))
    qs = pope.load_split("pope_random")
    answers = [("Yes", "no", "No, there is not.", "Yes, there is a cat.")[i % 4] for i in range(len(qs))]
    logged = []
    for i, (q, answer) in enumerate(zip(qs, answers)):
        doc = {"id": str(i), "question_id": str(q.question_id), "question": q.text, "answer": q.label,
               "image_source": q.image.removesuffix(".jpg"), "category": "random"}
        inst = Instance("generate_until", (q.text + SUFFIX, {"max_new_tokens": 128}, None, i, "pope_random", "test"),
                        i, metadata={"task": "pope_random", "doc_id": i, "repeats": 1})
        inst.doc, inst.resps, inst.filtered_resps = doc, [answer], {"none": answer}
        logged.append(_process_document_results((i, doc, [inst]), task=task, filter_key="none", reasoning_tags=None,
                                                log_samples=True).logged_sample)
    tracker = EvaluationTracker(output_path=str(tmp_path / "lmms"))
    tracker.general_config_tracker.model_name_sanitized = "model"
    tracker.date_id = "20250301_101500"
    tracker.save_results_samples("pope_random", logged)
    (written,) = (tmp_path / "lmms" / "model").glob("*_samples_pope_random.jsonl")
    got = _score("pope", "--predictions", str(written), out=tmp_path / "got")
    native_file = tmp_path / "answers.jsonl"
    native_file.write_text("".join(json.dumps({"question_id": q.question_id, "text": a}) + "\n"
                                   for q, a in zip(qs, answers)))
    native = _score("pope", "--predictions", str(native_file), "--data", "coco", out=tmp_path / "native")
    assert got["split"] == "pope_random" and {k: got[k] for k in native} == native
