"""MME: 14 subtasks of yes/no questions, two per image, in the released folder layout; scored as its
`eval_tool/calculation.py` scores them.

Layout (`MME_Benchmark_release_version/`, or the `MME_Benchmark/` folder inside it): one folder per subtask.
artwork, celebrity, landmark, posters and scene keep their images in `images/` and their questions in
`questions_answers_YN/<image stem>.txt`; the others keep `<stem>.jpg|png` beside `<stem>.txt`. Each text line is
`question<TAB>Yes|No`.

Scoring: an answer is "yes" or "no" when it is exactly that (lower-cased), else by whether its first four
characters contain "yes" (checked first) or "no"; anything else is "other" (never correct). Per subtask, accuracy
is over questions and accuracy+ over images (both questions right); the subtask score is their sum in percent
(at most 200); perception sums 10 subtasks (at most 2000), cognition 4 (at most 800).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores, find_image, unique_keys

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
FIELDS = ("question",)


def find_root(path: Path) -> Path:
    """The folder holding the subtask folders: `path` itself or its single subfolder that holds them.

    Raises:
        FileNotFoundError: no subtask folder found.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"MME data {path}: not a folder (expected MME_Benchmark_release_version/)")
    for root in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if any((root / name).is_dir() for name in SUBTASKS):
            return root
    raise FileNotFoundError(f"MME data {path}: none of the subtask folders ({', '.join(SUBTASKS)}) is there "
                            "or one level below")


def read(path: Path, image_root: Path | None = None) -> BenchmarkData:
    """Reads every subtask folder present.

    Args:
        path: the released folder.
        image_root: unused (images sit beside the questions).

    Raises:
        FileNotFoundError: no subtask folder.
    """
    root = find_root(path)
    data = BenchmarkData([])
    for subtask in SUBTASKS:
        folder = root / subtask
        if not folder.is_dir():
            continue
        split = (folder / "questions_answers_YN").is_dir()
        text_dir, image_dir = (folder / "questions_answers_YN", folder / "images") if split else (folder, folder)
        for text_file in sorted(text_dir.glob("*.txt")):
            _read_file(text_file, image_dir, subtask, data)
    # `1.txt` and `1.jpg.txt` both name image 1.jpg, so even these keys can repeat.
    data.questions = unique_keys(data.questions, data.skipped)
    return data


def _read_file(text_file: Path, image_dir: Path, subtask: str, data: BenchmarkData) -> None:
    file = str(text_file)
    try:
        lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        data.skipped.append(DataError(file, None, "unreadable_file", f"cannot read it ({err})"))
        data.total += 2  # the file's two questions
        return
    image = find_image(image_dir, text_file.stem, (".jpg", ".png", ".jpeg", ".JPG", ".PNG"))
    for row, line in enumerate(lines):
        data.total += 1
        fields = line.split("\t")
        if image is None:
            data.skipped.append(DataError(file, row, "missing_image", f"no image {text_file.stem}.jpg/.png in "
                                                                      f"{image_dir}"))
        elif len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            data.skipped.append(DataError(file, row, "malformed_record", f"line {row + 1} is not "
                                                                         f"'question<TAB>Yes|No': {line[:80]!r}"))
        else:
            data.questions.append(Question(
                key=f"{subtask}/{image.name}/{row}", image=image, fields={"question": fields[0]},
                gold={"answer": fields[1].strip().lower(), "subtask": subtask, "image": image.name,
                      "lines": len(lines)},
                where=(file, row)))


def parse(question: Question, answer: str) -> str:
    """"yes", "no" or "other", by calculation.py's rule."""
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score(questions: list[Question], answers: dict[str, str]) -> Scores:
    """Accuracy, accuracy+ and score per subtask; perception and cognition totals.

    An image counts in accuracy+ only when every line of its question file was read and answered (a skipped
    row would otherwise decide its pair).

    Args:
        questions: the benchmark's questions.
        answers: raw answers by question key (questions without one are not scored).
    """
    right: dict[str, list[bool]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    lines: dict[tuple[str, str], int] = {}
    unparsable = []
    for q in questions:
        lines[q.gold["subtask"], q.gold["image"]] = q.gold["lines"]
        if q.key not in answers:
            continue
        label = parse(q, answers[q.key])
        if label == "other":
            unparsable.append((q.key, answers[q.key]))
        right[q.gold["subtask"]].append(label == q.gold["answer"])
        per_image[q.gold["subtask"], q.gold["image"]].append(label == q.gold["answer"])
    rows, totals = [], {"perception": 0.0, "cognition": 0.0}
    for subtask in SUBTASKS:
        if not right[subtask]:
            continue
        images = [hits for (task, image), hits in per_image.items()
                  if task == subtask and len(hits) == lines[task, image]]
        acc = 100 * sum(right[subtask]) / len(right[subtask])
        acc_plus = 100 * sum(all(hits) for hits in images) / len(images) if images else 0.0
        rows.append((subtask, {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                               "questions": len(right[subtask]), "images": len(images)}))
        totals["perception" if subtask in PERCEPTION else "cognition"] += acc + acc_plus
    missing = [s for s in SUBTASKS if not right[s]]
    notes = [f"subtasks without scored questions (not in the totals): {', '.join(missing)}"] if missing else []
    return Scores(rows=rows, summary={**totals, "total": totals["perception"] + totals["cognition"]},
                  unparsable=unparsable, notes=notes)
