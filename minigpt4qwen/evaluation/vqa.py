"""A generic JSONL (or JSON list) format for VQA and captioning sets, with the usual metrics.

VQA record: `{"id"?, "image": path, "question": str, "answers": [str, ...] | str}`; caption record:
`{"id"?, "image": path, "captions": [str, ...] | str}`. Relative image paths start at `--image-root` (default: the
data file's folder).

VQA: answers are normalised as the VQA evaluation does (newlines and tabs to spaces; punctuation dropped, or
replaced by a space when it joins words; periods not followed by a digit dropped; lower case; number words up
to ten as digits; articles dropped; its table that restores missing apostrophes, "dont" -> "don't", is not
applied). VQA accuracy: with several reference answers, the mean over leaving each one out of min(1, matches /
3) (VQAv2's 10-answer rule); with one, exact match. Exact match: equal to any reference.
Captions: BLEU-1..4 and CIDEr-D from pycocoevalcap, on text tokenised here (see `caption_tokens`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from minigpt4qwen.data.formats import DataError, read_json_records
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores

VQA_FIELDS = ("question",)
CAPTION_FIELDS = ()
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}


def read(path: Path, image_root: Path | None, answers_key: str) -> BenchmarkData:
    """Reads a VQA (`answers_key="answers"`) or caption (`"captions"`) file.

    Raises:
        DataError: the file is unreadable.
    """
    root = image_root or path.parent
    data = BenchmarkData([])
    for row, record in read_json_records(str(path)):
        data.total += 1
        if isinstance(record, DataError):
            data.skipped.append(record)
            continue
        try:
            question = _question(record, row, path, root, answers_key)
        except (ValueError, TypeError) as err:
            data.skipped.append(DataError(str(path), row, "malformed_record", str(err)))
            continue
        if not question.image.is_file():
            data.skipped.append(DataError(str(path), row, "missing_image", f"image {question.image}: no such file"))
            continue
        data.questions.append(question)
    return data


def _question(record: Any, row: int, path: Path, root: Path, answers_key: str) -> Question:
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a JSON object, got {type(record).__name__}")
    references = record.get(answers_key, record.get(answers_key.rstrip("s")))
    references = [references] if isinstance(references, str) else references
    if not isinstance(record.get("image"), str) or not references or \
            not all(isinstance(r, str) for r in references):
        raise ValueError(f"needs 'image' (a path) and '{answers_key}' (a string or a list of strings); "
                         f"fields: {sorted(record)}")
    fields = {}
    if answers_key == "answers":
        if not isinstance(record.get("question"), str):
            raise ValueError("needs 'question' (a string)")
        fields = {"question": record["question"]}
    return Question(key=str(record.get("id", row)), image=root / record["image"], fields=fields,
                    gold={"references": list(references)}, where=(str(path), row))


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (without its contraction table)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    joined = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        text = text.replace(p, "" if (p + " " in text or " " + p in text or joined) else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """VQA accuracy of one normalised answer against normalised references (see the module docstring)."""
    if len(references) == 1:
        return float(answer == references[0])
    matches = [min(1.0, sum(r == answer for j, r in enumerate(references) if j != i) / 3)
               for i in range(len(references))]
    return sum(matches) / len(matches)


def parse_vqa(question: Question, answer: str) -> str:
    """The normalised answer."""
    return normalize_answer(answer)


def score_vqa(questions: list[Question], answers: dict[str, str]) -> Scores:
    """VQA accuracy and exact match over the answered questions."""
    accuracy, exact = [], []
    for q in questions:
        if q.key in answers:
            answer = normalize_answer(answers[q.key])
            references = [normalize_answer(r) for r in q.gold["references"]]
            accuracy.append(vqa_accuracy(answer, references))
            exact.append(answer in references)
    n = len(accuracy)
    metrics = {"vqa_accuracy": 100 * sum(accuracy) / n if n else 0.0,
               "exact_match": 100 * sum(exact) / n if n else 0.0, "questions": n}
    return Scores(rows=[("all", metrics)], summary={k: v for k, v in metrics.items() if k != "questions"})


_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ve|'m|'ll|'d)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+(?:[-.]\w+)*|[^\w\s]")
# The PTB tokenizer writes brackets as -LRB- etc. and, lower-cased, pycocoevalcap keeps them as words.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def caption_tokens(text: str) -> str:
    """Lower-cased words separated by single spaces, clitics split off (`don't` -> `do n't`), brackets as
    `-lrb-` etc., other punctuation dropped: what pycocoevalcap's PTB tokenizer (a Java program) gives for ordinary
    captions, in Python (abbreviations such as `u.s.` lose their last period)."""
    text = _CLITIC.sub(r" \1", text.lower())
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t[0].isalnum() or t[0] in "-'" and len(t) > 1)


def parse_caption(question: Question, answer: str) -> str:
    """The tokenised caption."""
    return caption_tokens(answer)


def score_caption(questions: list[Question], answers: dict[str, str]) -> Scores:
    """BLEU-1..4 and CIDEr-D (pycocoevalcap) over the answered images, in percent."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    answered = [q for q in questions if q.key in answers]
    if not answered:
        return Scores(rows=[], summary={})
    refs = {q.key: [caption_tokens(r) for r in q.gold["references"]] for q in answered}
    hyps = {q.key: [caption_tokens(answers[q.key])] for q in answered}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    metrics = {**{f"bleu_{n}": 100 * b for n, b in enumerate(bleu, start=1)}, "cider": 100 * cider,
               "images": len(answered)}
    return Scores(rows=[("all", metrics)], summary={"bleu_4": metrics["bleu_4"], "cider": metrics["cider"]})
