"""POPE: yes/no object-presence questions on COCO val2014 in three splits, scored as its `evaluate.py` does.

Data: `coco_pope_random.json`, `coco_pope_popular.json`, `coco_pope_adversarial.json` (one JSON object a line:
`{"question_id", "image", "text", "label": "yes"|"no"}`): `--data` names their folder or one of them;
`--image-root` the COCO val2014 folder (default: the data's folder).

Scoring: only the answer's first sentence counts (up to the first "."); commas are dropped; it is "no" when one of
its space-separated words is "No", "no" or "not", otherwise "yes". Per split: accuracy, precision, recall and F1
of "yes" as the positive class, and the yes-ratio (the share of "yes" predictions).
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores, unique_keys

SPLITS = ("random", "popular", "adversarial")
FIELDS = ("question",)


def split_files(path: Path) -> list[tuple[str, Path]]:
    """(split, file) for each split file at `path` (a folder, or one file).

    Raises:
        FileNotFoundError: none found.
    """
    if path.is_file():
        split = next((s for s in SPLITS if path.stem.endswith(s)), path.stem)
        return [(split, path)]
    # The name must end in .json: a backup such as coco_pope_random.json.bak would ask every question twice.
    found = [(s, f) for s in SPLITS for f in sorted(path.glob(f"*pope_{s}.json")) if f.is_file()]
    if not found:
        raise FileNotFoundError(f"POPE data {path}: no coco_pope_random.json / _popular / _adversarial there")
    return found


def read(path: Path, image_root: Path | None = None) -> BenchmarkData:
    """Reads every split file found.

    Args:
        path: the folder of the split files, or one of them.
        image_root: the COCO val2014 folder (default: the data's folder).
    """
    files = split_files(path)
    images = image_root or (path if path.is_dir() else path.parent)
    data = BenchmarkData([])
    for split, file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(str(file), None, "unreadable_file", f"cannot read it ({err})") from None
        for row, line in enumerate(lines):
            if not line.strip():
                continue
            data.total += 1
            try:
                record = json.loads(line)
                text, label, image = record["text"], str(record["label"]).strip().lower(), record["image"]
                if not isinstance(text, str) or not isinstance(image, str) or label not in ("yes", "no"):
                    raise ValueError("'text' and 'image' must be strings and 'label' yes or no")
            except (ValueError, KeyError, TypeError) as err:
                data.skipped.append(DataError(str(file), row, "malformed_record", f"line {row + 1}: {err}"))
                continue
            if not (images / image).is_file():
                data.skipped.append(DataError(str(file), row, "missing_image", f"image {images / image}: no such "
                                                                               "file"))
                continue
            data.questions.append(Question(
                key=f"{split}/{record.get('question_id', row)}", image=images / image, fields={"question": text},
                gold={"answer": label, "split": split}, where=(str(file), row)))
    # Keys are split/question_id: a repeated id, or two sets of one split (coco_ and aokvqa_), repeat them.
    data.questions = unique_keys(data.questions, data.skipped)
    return data


def parse(question: Question, answer: str) -> str:
    """"yes" or "no", by evaluate.py's rule."""
    first = answer.split(".")[0] if "." in answer else answer
    words = first.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def metrics(labels: list[str], predictions: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes is positive) and yes-ratio of one split; 0 where undefined."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / len(pairs), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * predictions.count("yes") / len(pairs), "questions": len(pairs)}


def score(questions: list[Question], answers: dict[str, str]) -> Scores:
    """The metrics per split, and their mean accuracy and F1 over the splits present.

    Args:
        questions: the benchmark's questions.
        answers: raw answers by question key (questions without one are not scored).
    """
    rows = []
    for split in dict.fromkeys(q.gold["split"] for q in questions):
        scored = [q for q in questions if q.gold["split"] == split and q.key in answers]
        if scored:
            rows.append((split, metrics([q.gold["answer"] for q in scored],
                                        [parse(q, answers[q.key]) for q in scored])))
    summary = {name: sum(m[name] for _, m in rows) / len(rows) for name in ("accuracy", "f1")} if rows else {}
    # Every answer maps to yes or no: nothing is unparsable by POPE's rule.
    return Scores(rows=rows, summary=summary)
