"""SEED-Bench (v1), image part: four-option questions of evaluation dimensions 1-9 on CC3M images.

Data: the released `SEED-Bench.json` (`{"questions": [{"question_id", "question", "choice_a".."choice_d",
"answer", "data_id", "data_type", "question_type_id"}, ...], "question_type": {name: id}}`); questions whose
`data_type` is not "image" (the video part) are left out. Images: `--image-root` (default: `SEED-Bench-image/`
beside the JSON), file `data_id` (or `data_id` + .jpg/.png).

Scoring: SEED-Bench's own script ranks the options by likelihood; a generated answer is read as VLMEvalKit reads
SEED-Bench's (exact matching: `choice.infer_choice` on every answer, whatever its length, so "The answer is B"
and "B. a bicycle" read as B). Accuracy per question type and over all image questions.
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation.choice import format_options, infer_choice
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores, find_image, unique_keys

FIELDS = ("question", "options")
LETTERS = ("A", "B", "C", "D")


def read(path: Path, image_root: Path | None = None) -> BenchmarkData:
    """Reads the image questions of SEED-Bench.json.

    Args:
        path: SEED-Bench.json.
        image_root: the image folder (default: SEED-Bench-image/ beside the JSON).

    Raises:
        DataError: the file is unreadable, has no "questions" list, or a "question_type" that is not an object
            of names to ids.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(str(path), None, "unreadable_file", f"cannot read it as JSON ({err})") from None
    records = document.get("questions") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise DataError(str(path), None, "unreadable_file", 'expected {"questions": [...], "question_type": {...}}')
    names = document.get("question_type") or {}
    if not isinstance(names, dict) or not all(_is_type_id(v) for v in names.values()):
        raise DataError(str(path), None, "unreadable_file", f'"question_type" must be an object of names to '
                                                            f'integer (or string) ids, got {str(names)[:80]}')
    types = {v: k for k, v in names.items()}
    images = image_root or path.parent / "SEED-Bench-image"
    data = BenchmarkData([])
    for row, record in enumerate(records):
        if not isinstance(record, dict) or record.get("data_type", "image") != "image":
            if not isinstance(record, dict):
                data.total += 1
                data.skipped.append(DataError(str(path), row, "malformed_record", "not a JSON object"))
            continue
        data.total += 1
        try:
            choices = {letter: str(record[f"choice_{letter.lower()}"]) for letter in LETTERS}
            answer, question, data_id = str(record["answer"]).strip(), str(record["question"]), str(record["data_id"])
            type_id = record["question_type_id"]
            if answer not in choices:
                raise ValueError(f"answer {answer!r} is not one of A-D")
            if not _is_type_id(type_id):  # a list or object would also break the lookup of its name
                raise ValueError(f"question_type_id {type_id!r} is not an integer (or string)")
        except (KeyError, ValueError) as err:
            data.skipped.append(DataError(str(path), row, "malformed_record", f"question {record.get('question_id')}: "
                                                                              f"{err}"))
            continue
        image = find_image(images, data_id)
        if image is None:
            data.skipped.append(DataError(str(path), row, "missing_image", f"no image {data_id} in {images}"))
            continue
        data.questions.append(Question(
            key=str(record.get("question_id", row)), image=image,
            fields={"question": question, "options": format_options(choices)},
            gold={"answer": answer, "choices": choices, "type": types.get(type_id, f"type {type_id}")},
            where=(str(path), row)))
    data.questions = unique_keys(data.questions, data.skipped)
    return data


def _is_type_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def parse(question: Question, answer: str) -> str | None:
    """The option letter ("Z" for a refusal), or None."""
    # As VLMEvalKit (choice.py's commit) reads every prediction, long ones included: a length limit would count
    # "The answer is B" as unparsable.
    return infer_choice(answer, question.gold["choices"])


def score(questions: list[Question], answers: dict[str, str]) -> Scores:
    """Accuracy per question type and over all answered questions.

    Args:
        questions: the benchmark's questions.
        answers: raw answers by question key.
    """
    by_type: dict[str, list[bool]] = {}
    unparsable = []
    for q in questions:
        if q.key not in answers:
            continue
        letter = parse(q, answers[q.key])
        if letter is None:
            unparsable.append((q.key, answers[q.key]))
        by_type.setdefault(q.gold["type"], []).append(letter == q.gold["answer"])
    rows = [(name, {"accuracy": 100 * sum(h) / len(h), "questions": len(h)}) for name, h in by_type.items()]
    everything = [hit for h in by_type.values() for hit in h]
    summary = {"accuracy": 100 * sum(everything) / len(everything) if everything else 0.0,
               "questions": len(everything)}
    return Scores(rows=rows, summary=summary, unparsable=unparsable)
