"""What every benchmark reader produces: questions with their image and template fields, the bad rows it
skipped, and what a scorer returns."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.data.images import ImageLoadError, load_image

# A file, or the encoded bytes of an image (MMBench keeps its images base64-encoded inside the TSV).
ImageSource = Path | bytes


@dataclass(frozen=True)
class Question:
    """One question to ask the model.

    Attributes:
        key: unique within the benchmark and stable across runs (predictions are resumed by it); readers keep the
            first question of a key and skip later ones (`unique_keys`).
        image: the question's image.
        fields: the values the prompt template may use, e.g. {"question": ..., "options": ...}.
        gold: what scoring needs (the answer, the subtask or category, ...).
        where: the file and row it came from, for error messages.
    """

    key: str
    image: ImageSource
    fields: Mapping[str, str]
    gold: Mapping[str, Any]
    where: tuple[str, int | None] = ("", None)


@dataclass
class BenchmarkData:
    """A benchmark as read: the questions to ask, the rows that could not be used, and how many there were.

    Attributes:
        questions: in a fixed order (the order predictions are made and reported in).
        skipped: one error per bad row (file, row, kind, detail); those rows are not asked.
        total: questions in the data, bad ones included.
    """

    questions: list[Question]
    skipped: list[DataError] = field(default_factory=list)
    total: int = 0


@dataclass
class Scores:
    """A benchmark's scores.

    Attributes:
        rows: the table, one (name, metrics) per subtask / category / split.
        summary: the headline numbers.
        unparsable: (key, raw answer) of each answer no option or label could be read from.
        notes: anything the reader of the scores must know (e.g. subtasks missing from the data).
    """

    rows: list[tuple[str, dict[str, float]]]
    summary: dict[str, float]
    unparsable: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def unique_keys(questions: Iterable[Question], skipped: list[DataError]) -> list[Question]:
    """The questions whose key no earlier question has, in order; each later one is appended to `skipped` as a
    malformed record naming its file, row and key.

    Predictions and scores are looked up by key: a repeated key would score one question with another's answer.
    """
    first: dict[str, Question] = {}
    kept = []
    for question in questions:
        if question.key in first:
            earlier = first[question.key].where
            skipped.append(DataError(question.where[0], question.where[1], "malformed_record",
                                     f"question key {question.key!r} repeats that of {earlier[0]}: record "
                                     f"{earlier[1]}; only the first is asked"))
            continue
        first[question.key] = question
        kept.append(question)
    return kept


def open_image(source: ImageSource, where: str) -> Image.Image:
    """Decodes a question's image as RGB.

    Args:
        source: a path or encoded bytes.
        where: names the question's file and row in the error.

    Raises:
        ImageLoadError: a missing file or undecodable data.
    """
    if isinstance(source, Path):
        return load_image(str(source))
    try:
        with Image.open(io.BytesIO(source)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(where, "corrupt_image", f"cannot decode the embedded image ({type(err).__name__})") \
            from None


def find_image(folder: Path, name: str, suffixes: tuple[str, ...] = (".jpg", ".png", ".jpeg")) -> Path | None:
    """`folder/name` if it is a file, else `folder/name + suffix` for the first suffix that exists."""
    for candidate in (folder / name, *(folder / f"{name}{s}" for s in suffixes)):
        if candidate.is_file():
            return candidate
    return None
