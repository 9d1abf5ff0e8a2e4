"""Annotation readers: the original's JSON, LLaVA conversations, MiniGPT-4's cc_sbu_align and text-only records.

Every format becomes a `Conversation`: ChatML messages with `<ImageHere>` markers plus the image paths in marker
order, tagged with its file and record index. A bad record yields a `DataError` naming both, so callers can stop
or skip and count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from minigpt4qwen.data.config import DatasetSpec
from minigpt4qwen.text.conversation import IMAGE_MARKER

# The original wraps each image as `<Img><ImageHere></Img>`; the wrapper text is kept so its token layout is too.
IMAGE_WRAP = f"<Img>{IMAGE_MARKER}</Img>"
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# MiniGPT-4's stage-2 alignment prompts; the record index picks one, so a record always reads the same.
CC_SBU_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
PROBLEM_KINDS = (
    "unreadable_file",
    "malformed_record",
    "unknown_role",
    "marker_mismatch",
    "empty_instruction",
    "empty_answer",
    "missing_image",
    "corrupt_image",
    "too_long",
    "no_supervised_tokens",
)


class DataError(ValueError):
    """A problem with one record (or a whole file when `index` is None), located precisely.

    Attributes:
        file: the annotation file.
        index: 0-based record index in the file (the line index for .jsonl), or None for the whole file.
        kind: one of PROBLEM_KINDS.
        detail: what is wrong, in words.
    """

    def __init__(self, file: str, index: int | None, kind: str, detail: str) -> None:
        where = file if index is None else f"{file}: record {index}"
        super().__init__(f"{where}: {kind}: {detail}")
        self.file, self.index, self.kind, self.detail = file, index, kind, detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised inside DataLoader workers and re-raised in the main process: it must survive pickling.
        return (DataError, (self.file, self.index, self.kind, self.detail))


@dataclass(frozen=True, slots=True)
class Conversation:
    """One training sample before tokenization.

    Attributes:
        messages: (role, content) pairs: an optional system turn, then user/assistant turns alternating and
            ending with an assistant turn; `<ImageHere>` markers only in user turns.
        images: image paths, one per marker, in marker order.
        file: the annotation file it came from.
        index: its record index there.
    """

    messages: tuple[tuple[str, str], ...]
    images: tuple[str, ...]
    file: str
    index: int

    def as_messages(self) -> list[dict[str, str]]:
        """The messages as `{"role", "content"}` dicts (the chat-template format)."""
        return [{"role": role, "content": content} for role, content in self.messages]


def read_annotations(spec: DatasetSpec) -> Iterator[Conversation | DataError]:
    """Read every record of one annotation file.

    Args:
        spec: the file, its format and image root.

    Returns:
        An iterator with, per record in file order, its Conversation or the DataError that describes it.

    Raises:
        DataError: (kind "unreadable_file") the file is missing, is not JSON, or has the wrong top-level shape.
    """
    file = spec.annotation
    for index, raw in _raw_records(spec):
        if isinstance(raw, DataError):
            yield raw
            continue
        try:
            messages, images = _PARSERS[spec.format](raw, index)
            yield _validated(messages, images, spec, index)
        except MalformedRecord as err:
            yield DataError(file, index, err.kind, str(err))


class MalformedRecord(Exception):
    """A record-level problem found by a parser, located (file, index) by the caller as a `DataError`."""

    def __init__(self, detail: str, kind: str = "malformed_record") -> None:
        super().__init__(detail)
        self.kind = kind


def _raw_records(spec: DatasetSpec) -> Iterator[tuple[int, Any]]:
    """(index, decoded JSON record or the DataError of an undecodable .jsonl line) for each record."""
    return read_json_records(spec.annotation, "annotations" if spec.format == "cc_sbu_align" else None)


def read_json_records(file: str, list_key: str | None = None) -> Iterator[tuple[int, Any]]:
    """(index, decoded record) for each record of a JSON list or (by the .jsonl suffix) a JSONL file; an
    undecodable JSONL line comes as (index, DataError) so that the caller can skip or stop.

    Args:
        file: the path.
        list_key: also accept {list_key: [...]} (e.g. cc_sbu_align's "annotations").

    Raises:
        DataError: (kind "unreadable_file") a missing or undecodable file, or JSON that is not a list.
    """
    try:
        if file.endswith(".jsonl"):
            with open(file, "rb") as f:  # bytes: one line that is not UTF-8 is one bad record, not a bad file
                for index, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        yield index, json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                        yield index, DataError(file, index, "malformed_record", f"line {index + 1} is not JSON in "
                                               f"UTF-8 ({type(err).__name__}: {str(err)[:120]})")
            return
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(file, None, "unreadable_file", f"cannot read the file ({err})") from None
    if list_key is not None and isinstance(data, dict):
        data = data.get(list_key)
    if not isinstance(data, list):
        expected = f'{{"{list_key}": [...]}} or a list' if list_key else "a JSON list of records"
        raise DataError(file, None, "unreadable_file", f"expected {expected}, got {type(data).__name__}")
    yield from enumerate(data)


def _field(record: Any, key: str, types: tuple[type, ...], required: bool = True) -> Any:
    """record[key], checked to be a dict field of one of `types` (None when optional and absent)."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if key not in record:
        if required:
            raise MalformedRecord(f"missing field {key!r} (fields: {sorted(record)})")
        return None
    value = record[key]
    if not isinstance(value, types):
        names = " or ".join("list" if t is list else t.__name__ for t in types)
        raise MalformedRecord(f"field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _str_list(value: str | list, key: str) -> list[str]:
    """A str or a list of str as a list, rejecting other element types."""
    items = [value] if isinstance(value, str) else value
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise MalformedRecord(f"{key}[{i}] must be str, got {type(item).__name__}")
    return items


def _images(record: dict) -> list[str]:
    """The record's optional "image" field (one path or a list)."""
    if isinstance(record, dict) and "video" in record and "image" not in record:
        raise MalformedRecord("video records are not supported (field 'video'); give image paths in 'image'")
    value = _field(record, "image", (str, list), required=False)
    return [] if value is None else _str_list(value, "image")


def _parse_minigpt4qwen(record: Any, index: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The original's {"image", "instruction": str | [str], "output": str | [str]}."""
    instruction = _field(record, "instruction", (str, list))
    output = _field(record, "output", (str, list))
    if isinstance(instruction, str) != isinstance(output, str):
        raise MalformedRecord("'instruction' and 'output' must both be str (one turn) or both lists (multi-turn)")
    questions, answers = _str_list(instruction, "instruction"), _str_list(output, "output")
    if len(questions) != len(answers) or not questions:
        raise MalformedRecord(f"'instruction' has {len(questions)} turns but 'output' has {len(answers)}")
    messages = [m for q, a in zip(questions, answers, strict=True) for m in (("user", q), ("assistant", a))]
    return messages, _images(record)


def _parse_llava(record: Any, index: int) -> tuple[list[tuple[str, str]], list[str]]:
    """LLaVA's {"image", "conversations": [{"from": "human" | "gpt", "value"}]}, `<image>` as the marker."""
    turns = _field(record, "conversations", (list,))
    messages = []
    for i, turn in enumerate(turns):
        source = _field(turn, "from", (str,))
        value = _field(turn, "value", (str,))
        if source not in LLAVA_ROLES:
            detail = f"conversations[{i}]: unknown role {source!r} (expected one of {sorted(LLAVA_ROLES)})"
            raise MalformedRecord(detail, "unknown_role")
        role = LLAVA_ROLES[source]
        if role == "user":
            value = _llava_image_first(value)
        # A marker left in another turn is reported by `_validated` (only user turns may hold images).
        messages.append((role, value.replace(LLAVA_IMAGE_TOKEN, IMAGE_WRAP)))
    # LLaVA's and the original's preprocessing both skip replies that open a conversation.
    while len(messages) > 1 and messages[0][0] == "assistant":
        messages.pop(0)
    return messages, _images(record)


def _llava_image_first(value: str) -> str:
    """A LLaVA question with a lone `<image>` moved to the front, "<image>\\n" + the rest stripped, as LLaVA's own
    preprocessing lays it out (so "What is this?\\n<image>" trains as LLaVA trained it: image, then question).
    Several `<image>` tokens stay in place: where each sits between the words is what tells them apart."""
    if value.count(LLAVA_IMAGE_TOKEN) != 1:
        return value
    rest = value.replace(LLAVA_IMAGE_TOKEN, "").strip()
    return f"{LLAVA_IMAGE_TOKEN}\n{rest}".strip()


def _parse_cc_sbu_align(record: Any, index: int) -> tuple[list[tuple[str, str]], list[str]]:
    """MiniGPT-4's {"image_id", "caption"}: image `{image_id}.jpg`, a describe-the-image instruction."""
    image_id = _field(record, "image_id", (str, int))
    caption = _field(record, "caption", (str,))
    prompt = CC_SBU_PROMPTS[index % len(CC_SBU_PROMPTS)]
    return [("user", f"{IMAGE_WRAP} {prompt}"), ("assistant", caption)], [f"{image_id}.jpg"]


def _parse_text(record: Any, index: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Text-only {"messages": [{"role": "system" | "user" | "assistant", "content"}]}."""
    turns = _field(record, "messages", (list,))
    messages = []
    for i, turn in enumerate(turns):
        role = _field(turn, "role", (str,))
        if role not in ("system", "user", "assistant"):
            detail = f"messages[{i}]: unknown role {role!r} (expected system, user, assistant)"
            raise MalformedRecord(detail, "unknown_role")
        messages.append((role, _field(turn, "content", (str,))))
    return messages, []


_PARSERS = {
    "minigpt4qwen": _parse_minigpt4qwen,
    "llava": _parse_llava,
    "cc_sbu_align": _parse_cc_sbu_align,
    "text": _parse_text,
}


def _validated(messages: list[tuple[str, str]], images: list[str], spec: DatasetSpec, index: int) -> Conversation:
    """Check the text, turn structure, questions, answers and markers, and resolve image paths."""
    for i, (role, content) in enumerate(messages):
        # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer accepts: caught here, the record is
        # reported (or skipped) once, instead of failing later in a batched tokenizer call that names no record.
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise MalformedRecord(f"message {i} ({role}): the text is not valid Unicode: "
                                  f"{content[err.start:err.end]!r} at character {err.start} ({err.reason})") from None
    body = messages[1:] if messages and messages[0][0] == "system" else messages
    if not body:
        raise MalformedRecord("the conversation has no user/assistant turns")
    for i, (role, content) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise MalformedRecord(f"turn {i} is {role!r} where {expected!r} was expected (turns must alternate)")
        if role == "assistant" and not content.strip():
            raise MalformedRecord(f"turn {i}: the answer is empty", "empty_answer")
        # A question of only an image holds its marker, so it is not empty; a blank one has nothing to answer.
        if role == "user" and not content.strip():
            raise MalformedRecord(f"turn {i}: the instruction is empty (no text, no image)", "empty_instruction")
    if body[-1][0] != "assistant":
        raise MalformedRecord("the conversation ends with a user turn: there is no answer to learn", "empty_answer")
    for role, content in messages:
        if role != "user" and IMAGE_MARKER in content:
            detail = f"an image marker in a {role} turn (only user turns may hold images)"
            raise MalformedRecord(detail, "marker_mismatch")
    markers = sum(content.count(IMAGE_MARKER) for _, content in messages)
    if markers != len(images):
        raise MalformedRecord(f"{markers} image markers in the text but {len(images)} images", "marker_mismatch")
    if any(not path for path in images):
        raise MalformedRecord("an image path is empty")
    resolved = tuple(os.path.join(spec.image_root, path) for path in images)
    return Conversation(tuple(messages), resolved, spec.annotation, index)
