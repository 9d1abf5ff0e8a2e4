"""MMBench and MMBench-CN: multiple-choice questions in the released TSV (base64 images), scored with circular
evaluation as VLMEvalKit scores them (exact matching, no LLM judge).

Data: a TSV with columns `index, question, hint, A, B, C, D, answer, category, l2-category, image, ...` read as
VLMEvalKit reads it (pandas: `None`, `NA`, `N/A`, empty... count as missing, so such an option does not exist).
The dev TSVs already hold each question's rotations: row `index + k * 1e6` asks question `index` with the options
shifted by k; a question without rotations in the file gets them here. An `image` of at most 64 characters names
the row whose image to use.

Scoring: each rotation's answer is read with `choice.infer_choice`. A question is right only when every rotation
is; one rotation answered wrong makes it wrong; a rotation whose answer names no option also makes it wrong and is
listed as unparsable. Accuracy overall, per `l2-category` and per `category`.
"""

from __future__ import annotations

import base64
import binascii
import string
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation.choice import format_options, infer_choice
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores, unique_keys

ROTATION = 1_000_000
FIELDS = ("question", "options", "hint", "hint_line")
_REQUIRED = ("index", "question", "answer", "image", "A", "B")


def _read_table(path: Path) -> tuple[list[dict[str, Any]], list[DataError]]:
    """The TSV's rows (missing cells are None) and one error per line pandas had to skip."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"MMBench data {path}: no such file (expected the released .tsv)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(path, sep="\t", on_bad_lines="warn")
        # EmptyDataError (an empty file) is a ValueError, not a ParserError.
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
            raise DataError(str(path), None, "unreadable_file", f"not a readable TSV ({err})") from None
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(str(path), None, "unreadable_file", f"no column(s) {missing}; columns: {list(frame.columns)}")
    bad = [DataError(str(path), None, "malformed_record", line.strip())
           for w in caught if issubclass(w.category, pd.errors.ParserWarning)
           for line in str(w.message).splitlines() if line.strip()]
    rows = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]
    return rows, bad


def read(path: Path, image_root: Path | None = None) -> BenchmarkData:
    """Reads the TSV: every row (rotations included) becomes a question; rotations are added where missing.

    Args:
        path: the .tsv file.
        image_root: unused (images are inside the TSV).

    Raises:
        FileNotFoundError / DataError: no file, or not a TSV with MMBench's columns.
    """
    rows, skipped = _read_table(path)
    file = str(path)
    data = BenchmarkData([], skipped, total=len(rows) + len(skipped))
    images: dict[int | None, str] = {}
    for r in rows:  # the first row of an index holds its image, as the first is the question asked
        if r["image"] is not None:
            images.setdefault(_as_int(r["index"]), str(r["image"]))
    parsed = []
    for row_number, row in enumerate(rows):
        try:
            parsed.append(_question(row, row_number, file, images))
        except DataError as err:
            data.skipped.append(err)
    # Before grouping: a repeated index would pass for a rotation row and keep the question's rotations unmade.
    by_question: dict[int, list[Question]] = defaultdict(list)
    for question in unique_keys(parsed, data.skipped):
        by_question[question.gold["group"]].append(question)
    for group, questions in sorted(by_question.items()):
        main = [q for q in questions if q.gold["rotation"] == 0]
        if not main:
            for q in questions:
                data.skipped.append(DataError(file, q.where[1], "malformed_record",
                                              f"rotation of question {group}, whose own row is missing or bad"))
            continue
        if len(questions) == 1:
            questions = [main[0], *_rotations(main[0])]
            data.total += len(questions) - 1
        data.questions.extend(sorted(questions, key=lambda q: q.gold["rotation"]))
    return data


def _as_int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _question(row: dict[str, Any], row_number: int, file: str, images: dict[int | None, str]) -> Question:
    index = _as_int(row["index"])
    if index is None:
        raise DataError(file, row_number, "malformed_record", f"index {row['index']!r} is not an integer")
    choices = {c: str(row[c]) for c in string.ascii_uppercase if row.get(c) is not None}
    answer = str(row["answer"]).strip() if row["answer"] is not None else None
    if row["question"] is None or len(choices) < 2 or answer not in choices:
        raise DataError(file, row_number, "malformed_record", f"index {index}: needs a question, two options or "
                        f"more and an answer among them (answer {answer!r}, options {sorted(choices)})")
    image = str(row["image"]) if row["image"] is not None else ""
    if 0 < len(image) <= 64:  # a reference to the row that holds the image
        image = images.get(_as_int(image), "")
    try:
        encoded = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        encoded = b""
    if not encoded:
        raise DataError(file, row_number, "missing_image" if not image else "corrupt_image",
                        f"index {index}: no base64 image (nor a reference to a row with one)")
    hint = str(row["hint"]) if row.get("hint") is not None else ""
    return Question(
        key=str(index), image=encoded,
        fields={"question": str(row["question"]), "options": format_options(choices), "hint": hint,
                "hint_line": f"Hint: {hint}\n" if hint else ""},
        gold={"answer": answer, "choices": choices, "group": index % ROTATION, "rotation": index // ROTATION,
              "category": str(row.get("category") or "?"), "l2_category": str(row.get("l2-category") or "?")},
        where=(file, row_number))


def _rotations(main: Question) -> list[Question]:
    """The question with its options shifted by 1..n-1 (option k+j becomes option j), as the dev TSVs hold."""
    letters = list(main.gold["choices"])
    texts = list(main.gold["choices"].values())
    out = []
    for k in range(1, len(letters)):
        choices = {letter: texts[(j + k) % len(texts)] for j, letter in enumerate(letters)}
        answer = letters[(letters.index(main.gold["answer"]) - k) % len(letters)]
        out.append(Question(key=f"{main.key}/rotation{k}", image=main.image,
                            fields={**main.fields, "options": format_options(choices)},
                            gold={**main.gold, "answer": answer, "choices": choices, "rotation": k},
                            where=main.where))
    return out


def parse(question: Question, answer: str) -> str | None:
    """The option letter read from the answer ("Z" for a refusal), or None."""
    return infer_choice(answer, question.gold["choices"])


def score(questions: list[Question], answers: dict[str, str]) -> Scores:
    """Circular accuracy overall, per l2-category and per category.

    A question is scored only when all its rotations were answered.

    Args:
        questions: the benchmark's questions (rotations included).
        answers: raw answers by question key.
    """
    groups: dict[int, list[Question]] = defaultdict(list)
    for q in questions:
        groups[q.gold["group"]].append(q)
    hits: dict[str, list[bool]] = defaultdict(list)
    unparsable, failed_unread = [], 0
    for group in groups.values():
        if any(q.key not in answers for q in group):
            continue
        read = [parse(q, answers[q.key]) for q in group]
        wrong = any(r is not None and r != q.gold["answer"] for r, q in zip(read, group, strict=True))
        unread = [(q.key, answers[q.key]) for r, q in zip(read, group, strict=True) if r is None]
        unparsable.extend(unread)
        failed_unread += bool(unread) and not wrong
        main = group[0].gold
        for name in ("Overall", f"[L2] {main['l2_category']}", main["category"]):
            hits[name].append(not wrong and not unread)
    overall = hits.pop("Overall", [])
    rows = [(name, {"accuracy": 100 * sum(h) / len(h), "questions": len(h)}) for name, h in sorted(hits.items())]
    summary = {"accuracy": 100 * sum(overall) / len(overall) if overall else 0.0, "questions": len(overall)}
    notes = [f"{failed_unread} question(s) wrong only because a rotation's answer named no option"] \
        if failed_unread else []
    return Scores(rows=rows, summary=summary, unparsable=unparsable, notes=notes)
