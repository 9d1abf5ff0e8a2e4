"""Benchmark readers and scorers: tiny sets in each released layout, fixed answers, scores computed by hand."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation import mmbench, mme, pope, seed, vqa
from minigpt4qwen.evaluation.benchmarks import BENCHMARKS
from minigpt4qwen.evaluation.choice import infer_choice
from minigpt4qwen.evaluation.prompts import check_template, render
from minigpt4qwen.evaluation.report import compare, markdown
from minigpt4qwen.evaluation.runner import evaluate


def _image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _png_b64(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class NoAnswers:
    """An answerer for runs whose predictions file already holds every answer."""

    image_size = 8

    def answer(self, requests):
        raise AssertionError(f"asked {len(requests)} question(s): the predictions file should have held them")


def _score_fixed(benchmark, data, answers, tmp_path):
    """Scores `answers` the way `eval` does: from a predictions file, through the runner and the report."""
    out = tmp_path / "out"
    out.mkdir(parents=True)
    keys = {q.key for q in data.questions}
    assert set(answers) <= keys, sorted(set(answers) - keys)
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps({"key": k, "answer": a}) + "\n" for k, a in answers.items()))
    results, made = evaluate(BENCHMARKS[benchmark], data, "data", out, NoAnswers(), template="{question}",
                             settings={"prompt_template": "{question}", "system_prompt": "s", "max_new_tokens": 1},
                             model={"model_dir": "m"}, progress=False)
    assert made.answered_now == 0
    return results, {row["name"]: row for row in results["table"]}


def _mme_layout(root):
    """existence (images beside the questions), artwork (images/ + questions_answers_YN/), code_reasoning."""
    base = root / "MME_Benchmark_release_version" / "MME_Benchmark"
    files = {
        "existence/1.txt": "Is there a dog? Please answer yes or no.\tYes\nIs there a cat?\tNo\n",
        "existence/2.txt": "Q a\tYes\nQ b\tNo\n",
        "existence/3.txt": "Q a\tYes\nQ b\tNo\n",
        "existence/4.txt": "Q a\tYes\na line without its answer\n",
        "existence/5.txt": "Q a\tYes\nQ b\tNo\n",  # no image
        "artwork/questions_answers_YN/a1.txt": "Q a\tYes\nQ b\tNo\n",
        "artwork/questions_answers_YN/a2.txt": "Q a\tYes \nQ b\tno\n",
        "code_reasoning/c1.txt": "Q a\tYes\nQ b\tNo\n",
    }
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    for name in ("existence/1.jpg", "existence/2.png", "existence/3.jpg", "existence/4.jpg", "artwork/images/a1.jpg",
                 "artwork/images/a2.jpg", "code_reasoning/c1.png"):
        _image(base / name)
    return root / "MME_Benchmark_release_version"


def test_mme_layout_pairs_and_scores(tmp_path):
    data = mme.read(_mme_layout(tmp_path))
    assert data.total == 16 and len(data.questions) == 13
    assert sorted((e.kind, e.index) for e in data.skipped) == [("malformed_record", 1), ("missing_image", 0),
                                                                ("missing_image", 1)]
    answers = {
        "existence/1.jpg/0": "Yes", "existence/1.jpg/1": "No.",                  # image right
        "existence/2.png/0": "yes, there is", "existence/2.png/1": "The answer is no",  # "other": wrong
        "existence/3.jpg/0": "nope", "existence/3.jpg/1": "yes",                 # both wrong
        "existence/4.jpg/0": "Yes",                    # right, but its pair has a bad row: not in acc+
        "artwork/a1.jpg/0": "Yes", "artwork/a1.jpg/1": "not at all",             # "not " -> no: image right
        "artwork/a2.jpg/0": "Y", "artwork/a2.jpg/1": "NO",                       # "Y" is other
        "code_reasoning/c1.png/0": "yes", "code_reasoning/c1.png/1": "no",
    }
    results, rows = _score_fixed("mme", data, answers, tmp_path)
    assert rows["existence"]["acc"] == pytest.approx(100 * 4 / 7)
    assert rows["existence"]["acc_plus"] == pytest.approx(100 / 3) and rows["existence"]["images"] == 3
    assert rows["artwork"]["acc"] == 75 and rows["artwork"]["acc_plus"] == 50 and rows["artwork"]["score"] == 125
    assert rows["code_reasoning"]["score"] == 200
    assert results["summary"]["perception"] == pytest.approx(100 * 4 / 7 + 100 / 3 + 125)
    assert results["summary"]["cognition"] == 200
    assert results["unparsable"]["count"] == 2
    assert {u["answer"] for u in results["unparsable"]["answers"]} == {"The answer is no", "Y"}
    assert results["questions"] == {"total": 16, "scored": 13, "skipped": 3}
    assert any("count" in note for note in results["notes"])  # subtasks absent from the data are named
    assert [mme.parse(None, a) for a in ("No", " yes", "noyes", "Yes!", "")] == ["no", "yes", "no", "yes", "other"]


def _mmbench_tsv(path):
    rows = [  # index, question, hint, A, B, C, D, answer, category, l2-category, image
        (1, "What animal?", "", "cat", "dog", "bird", "fish", "B", "cat_x", "L2a", _png_b64("red")),
        (1000001, "What animal?", "", "dog", "bird", "fish", "cat", "A", "cat_x", "L2a", _png_b64("red")),
        (2000001, "What animal?", "", "bird", "fish", "cat", "dog", "D", "cat_x", "L2a", "1"),
        (3000001, "What animal?", "", "fish", "cat", "dog", "bird", "C", "cat_x", "L2a", "1"),
        (2, "Colour?", "It is warm.", "red", "blue", "", "", "A", "cat_x", "L2a", _png_b64("red")),
        (1000002, "Colour?", "It is warm.", "blue", "red", "", "", "B", "cat_x", "L2a", _png_b64("red")),
        (3, "How many?", "", "one", "two", "three", "", "C", "cat_y", "L2b", _png_b64("blue")),
        (4, "Which?", "", "None", "cat", "dog", "", "B", "cat_y", "L2b", _png_b64("blue")),  # "None" reads as missing
        (5, "Bad answer", "", "x", "y", "", "", "E", "cat_y", "L2b", _png_b64("blue")),
        (6, "Bad image", "", "x", "y", "", "", "A", "cat_y", "L2b", "not base64 at all " * 5),
        (7, "Shared image", "", "x", "y", "", "", "A", "cat_y", "L2a", "1"),
        (3, "Repeated index", "", "x", "y", "", "", "A", "cat_y", "L2b", _png_b64("blue")),
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
                         "image"])
        writer.writerows(rows)


def test_mmbench_tsv_rotations_and_circular_rule(tmp_path):
    _mmbench_tsv(tmp_path / "mmbench_dev.tsv")
    data = mmbench.read(tmp_path / "mmbench_dev.tsv")
    keys = [q.key for q in data.questions]
    assert keys == ["1", "1000001", "2000001", "3000001", "2", "1000002", "3", "3/rotation1", "3/rotation2", "4",
                    "4/rotation1", "7", "7/rotation1"]
    assert sorted((e.kind, e.index) for e in data.skipped) == [("corrupt_image", 9), ("malformed_record", 8),
                                                                ("malformed_record", 11)]
    assert "question key '3' repeats that of" in data.skipped[-1].detail and data.total == 16
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match=r"empty\.tsv: unreadable_file"):
        mmbench.read(tmp_path / "empty.tsv")
    generated = {q.key: q for q in data.questions}
    assert generated["3/rotation1"].fields["options"] == "A. two\nB. three\nC. one"
    assert generated["3/rotation1"].gold["answer"] == "B" and generated["3/rotation2"].gold["answer"] == "A"
    assert generated["4"].fields["options"] == "B. cat\nC. dog"  # VLMEvalKit (pandas) drops the "None" option
    assert generated["7"].image == generated["1"].image  # a short image cell names the row holding the image
    assert render(BENCHMARKS["mmbench"].template, generated["2"]) == (
        "Hint: It is warm.\nQuestion: Colour?\nOptions:\nA. red\nB. blue\n"
        "Please select the correct answer from the options above.")
    answers = {
        "1": "B. dog", "1000001": "dog", "2000001": "(D)", "3000001": "I think the answer is C",  # all right
        "2": "A", "1000002": "A",                            # the rotation is wrong: question wrong
        "3": "C", "3/rotation1": "B", "3/rotation2": "hmm, hard to say",  # unparsable: wrong, listed
        "4": "B", "4/rotation1": "C",
        "7": "A cat is shown", "7/rotation1": "A",           # "A" the article reads as option A
    }
    results, rows = _score_fixed("mmbench", data, answers, tmp_path)
    assert results["summary"] == {"accuracy": 40.0, "questions": 5}
    assert rows["cat_x"]["accuracy"] == 50 and rows["cat_y"]["accuracy"] == pytest.approx(100 / 3)
    assert rows["[L2] L2a"]["accuracy"] == pytest.approx(100 / 3) and rows["[L2] L2b"]["accuracy"] == 50
    assert results["unparsable"] == {"count": 1, "answers": [{"key": "3/rotation2", "answer": "hmm, hard to say"}]}
    assert results["notes"] == ["1 question(s) wrong only because a rotation's answer named no option"]


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(C)", "C"), ("C.", "C"), ("**D**", "D"),
    ("A B", None),                                            # two letters, no "answer is", no option text
    ("The answer is B because A is wrong", "B"),              # several letters: the "answer is X" pattern
    ("answer is b", None), ("The answer is a dog.", "B"),    # only an upper-case letter, standing alone
    ("The answer is blue", None), ("The answer is Bird", "C"), ("The answer is **D**.", "D"),
    ("B is right since it shows the dog and not any cat at all", None),  # letter too early; too long for text
    ("dog", "B"), ("a dog or a cat", None),                   # option text: exactly one must match
    ("Sorry, I can't help with images of people yet.", "Z"), ("Z", "Z"),
    ("", None),
])
def test_option_extraction_corner_cases(answer, expected):
    assert infer_choice(answer, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == expected


def _pope_layout(root):
    random = [("y", "Yes"), ("y", "There is no doubt. Yes"), ("y", "NO"), ("n", "No."),
              ("n", "I see a dog, not a cat"), ("n", "Yes")]
    adversarial = [("y", "yes"), ("n", "yes"), ("y", "yes"), ("n", "no")]
    answers = {}
    for split, items in (("random", random), ("adversarial", adversarial)):
        lines = []
        for i, (label, answer) in enumerate(items):
            lines.append(json.dumps({"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a "
                                     f"thing {i}?", "label": "yes" if label == "y" else "no"}))
            answers[f"{split}/{i}"] = answer
            _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        if split == "random":
            lines += ['{"question_id": 99, "text": "no image field"}',
                      json.dumps({"question_id": 98, "image": "missing.jpg", "text": "t", "label": "no"}),
                      json.dumps({"question_id": 1, "image": f"COCO_val2014_{1:012d}.jpg", "text": "t", "label": "no"})]
        (root / "pope" / f"coco_pope_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "pope" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    (root / "pope" / "coco_pope_random.json.bak").write_text((root / "pope" / "coco_pope_random.json").read_text())
    return answers


def test_pope_splits_metrics_and_yes_ratio(tmp_path):
    answers = _pope_layout(tmp_path)
    data = pope.read(tmp_path / "pope", tmp_path / "val2014")
    assert data.total == 13 and len(data.questions) == 10  # the .bak copy is not read
    assert sorted(e.kind for e in data.skipped) == ["malformed_record", "malformed_record", "missing_image"]
    assert "coco_pope_random.json: record 8" in str(data.skipped[-1]) and "'random/1' repeats" in str(data.skipped[-1])
    results, rows = _score_fixed("pope", data, answers, tmp_path)
    # random: TP 2 (Yes, NO), FN 1 (first sentence "There is no doubt"), TN 2, FP 1
    assert rows["random"]["accuracy"] == pytest.approx(400 / 6)
    assert rows["random"]["precision"] == pytest.approx(200 / 3) and rows["random"]["recall"] == pytest.approx(200 / 3)
    assert rows["random"]["yes_ratio"] == 50
    # adversarial: TP 2, FP 1, TN 1, FN 0
    assert rows["adversarial"]["accuracy"] == 75 and rows["adversarial"]["recall"] == 100
    assert rows["adversarial"]["f1"] == pytest.approx(80) and rows["adversarial"]["yes_ratio"] == 75
    assert results["summary"]["accuracy"] == pytest.approx((400 / 6 + 75) / 2)
    assert list(rows) == ["random", "adversarial"]


def test_seed_bench_image_part(tmp_path):
    questions = [
        {"question_id": "1", "question_type_id": 1, "answer": "A", "data_id": "img1", "data_type": "image"},
        {"question_id": "2", "question_type_id": 1, "answer": "B", "data_id": "img2", "data_type": "image"},
        {"question_id": "3", "question_type_id": 2, "answer": "C", "data_id": "img3.jpg", "data_type": "image"},
        {"question_id": "4", "question_type_id": 2, "answer": "D", "data_id": "img4", "data_type": "image"},
        {"question_id": "v1", "question_type_id": 10, "answer": "A", "data_id": "1.webm", "data_type": "video"},
        {"question_id": "5", "question_type_id": 2, "answer": "E", "data_id": "img1", "data_type": "image"},
        {"question_id": "6", "question_type_id": [2], "answer": "A", "data_id": "img1", "data_type": "image"},
        {"question_id": "7", "question_type_id": None, "answer": "A", "data_id": "img1", "data_type": "image"},
        {"question_id": "1", "question_type_id": 2, "answer": "B", "data_id": "img2", "data_type": "image"},
    ]
    for q in questions:
        q.update(question="What?", choice_a="red", choice_b="green", choice_c="cat", choice_d="blue")
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(
        {"questions": questions, "question_type": {"Scene Understanding": 1, "Instance Identity": 2}}))
    for name in ("img1.jpg", "img2.jpg", "img3.jpg", "img4.png"):
        _image(tmp_path / "SEED-Bench-image" / name)
    data = seed.read(tmp_path / "SEED-Bench.json")
    assert [q.key for q in data.questions] == ["1", "2", "3", "4"] and data.total == 8  # the video part left out
    assert [(e.kind, e.index) for e in data.skipped] == [("malformed_record", i) for i in (5, 6, 7, 8)]
    assert "question_type_id [2]" in data.skipped[1].detail and "key '1' repeats" in data.skipped[3].detail
    answers = {"1": "A", "2": "The answer is B", "3": "(C) the cat", "4": "I am not sure"}  # long ones read too
    results, rows = _score_fixed("seed-bench", data, answers, tmp_path)
    assert rows["Scene Understanding"]["accuracy"] == 100 and rows["Instance Identity"]["accuracy"] == 50
    assert results["summary"]["accuracy"] == 75 and results["unparsable"]["count"] == 1
    for names in (None, ["Scene Understanding"], {"Scene Understanding": [1]}):
        (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": names}))
        if names is None:  # no names: types are numbered
            assert seed.read(tmp_path / "SEED-Bench.json").questions[0].gold["type"] == "type 1"
        else:
            with pytest.raises(DataError, match=r"SEED-Bench\.json: unreadable_file: \"question_type\" must be"):
                seed.read(tmp_path / "SEED-Bench.json")


def test_vqa_accuracy_and_normalisation(tmp_path):
    records = [{"id": "q1", "image": "a.jpg", "question": "How many?", "answers": ["2"] * 2 + ["3"] * 8},
               {"id": "q2", "image": "a.jpg", "question": "What?", "answers": "a red car"},
               {"id": "q3", "image": "missing.jpg", "question": "What?", "answers": ["x"]},
               {"id": "q4", "image": "a.jpg", "answers": ["x"]},
               {"id": "q5", "image": "a.jpg", "question": "Which?", "answers": ["don't know"] * 4 + ["no"] * 6},
               {"id": "q2", "image": "a.jpg", "question": "Again?", "answers": "a blue car"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    _image(tmp_path / "a.jpg")
    data = vqa.read(tmp_path / "vqa.jsonl", None, "answers")
    assert [q.key for q in data.questions] == ["q1", "q2", "q5"] and data.total == 7
    assert sorted(e.kind for e in data.skipped) == ["malformed_record"] * 3 + ["missing_image"]
    assert "vqa.jsonl: record 5: malformed_record: question key 'q2' repeats" in str(data.skipped[-1])
    results, _ = _score_fixed("vqa", data, {"q1": "Two.", "q2": "The red car", "q5": "Dont know"}, tmp_path)
    # q1: "two." -> "2"; leaving out a "2" leaves 1 match (1/3), leaving out a "3" leaves 2 (2/3): mean 0.6;
    # q5: "dont" reads as "don't": 3 or 4 matches whichever is left out, 1.0
    assert results["summary"] == {"vqa_accuracy": pytest.approx(260 / 3), "exact_match": 100}
    assert vqa.normalize_answer("Hello, world! It's 1,000.5 the end.") == "hello world it's 1000.5 end"
    # Whether a mark touches a space is asked of the text as given, not of the text its earlier marks left.
    assert vqa.normalize_answer("x-; y-z") == "x y z" and vqa.normalize_answer("a/-b c-d") == "b c d"
    assert [vqa.normalize_answer(a) for a in ("isnt", "I wouldntve", "youre", "Its well", "Im here", "shes")] == \
        ["isn't", "i wouldn't've", "you're", "its well", "im here", "she's"]  # "its", "well": words, left alone;
    # "im" stays, as in the official scorer (its table's "Im" never meets a lower-cased word)


def test_caption_tokens_match_the_ptb_tokenizer_and_scores(tmp_path):
    # Expected outputs of pycocoevalcap's PTBTokenizer (the Java program), recorded once.
    assert vqa.caption_tokens("A man riding a wave on top of a surfboard.") == \
        "a man riding a wave on top of a surfboard"
    assert vqa.caption_tokens("The dog's ball isn't red, it's blue!") == "the dog 's ball is n't red it 's blue"
    assert vqa.caption_tokens("Two black-and-white cows (grazing) in a field; 3.5 meters tall?") == \
        "two black-and-white cows -lrb- grazing -rrb- in a field 3.5 meters tall"
    assert vqa.caption_tokens("people... walking -- down the street") == "people walking down the street"
    records = [{"id": "c1", "image": "a.jpg", "captions": ["A red square.", "a red box"]},
               {"id": "c2", "image": "a.jpg", "captions": ["A blue circle on white."]}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    _image(tmp_path / "a.jpg")
    data = vqa.read(tmp_path / "caps.jsonl", None, "captions")
    results, rows = _score_fixed("caption", data, {"c1": "A red square", "c2": "A blue circle on white!"}, tmp_path)
    assert rows["all"]["bleu_1"] == pytest.approx(100, abs=1e-3) and rows["all"]["images"] == 2
    from pycocoevalcap.cider.cider import Cider
    expected, _ = Cider().compute_score({"c1": ["a red square", "a red box"], "c2": ["a blue circle on white"]},
                                        {"c1": ["a red square"], "c2": ["a blue circle on white"]})
    assert results["summary"]["cider"] == pytest.approx(100 * expected)


def test_templates_are_checked_and_results_compare(tmp_path):
    assert check_template("Q: {question}", BENCHMARKS["mme"].fields, "mme") == "Q: {question}"
    with pytest.raises(ValueError, match=r"\['options'\].*available fields: \['question'\]"):
        check_template("{question} {options}", BENCHMARKS["mme"].fields, "mme")
    with pytest.raises(ValueError, match="not a valid format string"):
        check_template("{question", BENCHMARKS["mme"].fields, "mme")
    data = mme.read(_mme_layout(tmp_path))
    a, _ = _score_fixed("mme", data, {q.key: "yes" for q in data.questions}, tmp_path / "a")
    b, _ = _score_fixed("mme", data, {q.key: q.gold["answer"] for q in data.questions}, tmp_path / "b")
    table = compare(a, b)
    assert "| existence | acc | 57.14 | 100.00 | +42.86 |" in table
    assert "| summary | cognition | 50.00 | 200.00 | +150.00 |" in table
    assert "scored 13 of 16 questions (3 skipped for bad data)" in markdown(b)
    with pytest.raises(ValueError, match="cannot compare mme results with pope"):
        compare(a, {**b, "benchmark": "pope"})
