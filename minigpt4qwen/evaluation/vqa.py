"""A generic JSONL (or JSON list) format for VQA and captioning sets, with the usual metrics.

VQA record: `{"id"?, "image": path, "question": str, "answers": [str, ...] | str}`; caption record:
`{"id"?, "image": path, "captions": [str, ...] | str}`. Relative image paths start at `--image-root` (default: the
data file's folder).

VQA: answers are normalised as the VQA evaluation does (newlines and tabs to spaces; punctuation dropped, or
replaced by a space when it joins words, judged on the text as given; periods not followed by a digit dropped;
lower case; number words up to ten as digits; articles dropped; missing apostrophes of contractions restored,
"dont" -> "don't", by a table of common contractions, see `_CONTRACTIONS`). VQA accuracy: with several
reference answers, the mean over leaving each one out of min(1, matches / 3) (VQAv2's 10-answer rule); with one,
exact match. Exact match: equal to any reference. A repeated `id` is skipped as a malformed record.
Captions: BLEU-1..4 and CIDEr-D from pycocoevalcap, on text tokenised here (see `caption_tokens`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from minigpt4qwen.data.formats import DataError, read_json_records
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores, unique_keys

VQA_FIELDS = ("question",)
CAPTION_FIELDS = ()
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Contractions whose apostrophes an answer may leave out. Not listed because their apostrophe-less form is a common
# word of its own: it's, i'd, i'll, he'll, she'd, she'll, we'd, we'll, we're, let's, who're, something's (the VQA
# table also leaves its, id, ill, hell, shell, wed, shed, well, were and lets alone). Listed although they are
# words too, as in the VQA table: can't (cant), won't (wont), how's and why's. The VQA table writes the I-forms
# with a capital I ("Im", "Ive", "Id've"), which its lower-cased words never match: left out here too, so that
# scores stay the official ones.
_CONTRACTION_FORMS = """
    ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't oughtn't
    shan't shouldn't wasn't weren't won't wouldn't could've might've must've should've would've not've
    couldn't've mightn't've mustn't've shouldn't've wouldn't've hadn't've
    you're you've you'll you'd you'd've he's he'd he'd've she's she'd've it'd it'll it'd've
    we've we'd've they're they've they'll they'd they'd've that's that'll that'd here's there's there're there'd
    there'll there'd've what's what're what'll what've what'd where's where'd where've when's why's why're why'll
    how's how'd how'll who's who'd who'll who've who'd've somebody's somebody'd somebody'll somebody'd've
    someone's someone'd someone'll someone'd've something'd something'll something'd've y'all y'all'll y'all'd've
    o'clock ma'am 'twas
""".split()


def _without_apostrophes(form: str) -> list[str]:
    """Every spelling of `form` with one or more of its apostrophes left out ("wouldn't've" -> "wouldnt've",
    "wouldn'tve", "wouldntve")."""
    parts = form.split("'")
    spellings = []
    for kept in range(2 ** (len(parts) - 1) - 1):  # bit i set: apostrophe i kept; all set (the form) excluded
        spelling = parts[0]
        for i, part in enumerate(parts[1:]):
            spelling += ("'" if kept >> i & 1 else "") + part
        spellings.append(spelling)
    return spellings


_CONTRACTIONS = {spelling: form for form in _CONTRACTION_FORMS for spelling in _without_apostrophes(form)}


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
    data.questions = unique_keys(data.questions, data.skipped)
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
    """The VQA evaluation's answer normalisation (see the module docstring)."""
    given = text.replace("\n", " ").replace("\t", " ").strip()
    joined = _DIGIT_COMMA.search(given) is not None
    text = given
    for p in _PUNCT:
        # Whether p touches a space is asked of the text as given, as the VQA evaluation does: asked of the text
        # rewritten so far, "x-; y" would keep "-" joined to the space its ";" left.
        text = text.replace(p, "" if (p + " " in given or " " + p in given or joined) else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
