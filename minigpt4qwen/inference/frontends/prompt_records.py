"""The prompt records of batch inference (`minigpt4qwen generate`) and the model inputs of one record.

A record is `{"id"?, "image"?: path | [paths], "query": str}`; the original training format works too
(`"instruction": str | [str]` with `"output"`: earlier turns become the history, the last instruction is asked).
Relative image paths start from `image_root` (default: the input file's folder). A bad record becomes a
`DataError` naming its file and index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.formats import DataError, MalformedRecord, read_json_records
from minigpt4qwen.data.images import ImageTransform
from minigpt4qwen.inference.engine import IMAGE_PROMPT
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.conversation import IMAGE_MARKER, render_with_template
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

# An image marker, wrapped in <Img></Img> or bare, with the whitespace after it.
IMAGE_MARKERS = re.compile(r"(?:<Img>\s*" + re.escape(IMAGE_MARKER) + r"\s*</Img>|" + re.escape(IMAGE_MARKER) + r")\s*")


@dataclass(frozen=True)
class Prompt:
    """One record to answer.

    Attributes:
        index: the record's index in its file (the line index for .jsonl).
        id: the record's "id", or its index.
        query: the question as given.
        images: resolved image paths, in marker order.
        history: earlier (question, answer) turns.
    """

    index: int
    id: Any
    query: str
    images: tuple[str, ...] = ()
    history: tuple[tuple[str, str], ...] = ()

    @property
    def question(self) -> str:
        """The question as a reader sees it: the query without its image markers (`<Img><ImageHere></Img>`)."""
        return IMAGE_MARKERS.sub("", self.query).strip()

    def messages(self, system_prompt: str) -> list[dict[str, str]]:
        """The ChatML messages, with one `<Img><ImageHere></Img>` per image before the first question unless
        the record places its markers itself (as `ChatSession` does)."""
        turns = [*self.history, (self.query, None)]
        if not any(IMAGE_MARKER in question for question, _ in turns):
            turns[0] = (IMAGE_PROMPT * len(self.images) + turns[0][0], turns[0][1])
        messages = [{"role": "system", "content": system_prompt}]
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return messages


def read_prompts(input_path: str | Path, image_root: str | Path | None = None) -> Iterator[Prompt | DataError]:
    """Reads every record of a prompt file.

    Args:
        input_path: a JSON list, or JSONL (by the .jsonl suffix).
        image_root: where relative image paths start (default: the input file's folder).

    Returns:
        An iterator with, per record in file order, its Prompt or the DataError describing what is wrong.

    Raises:
        DataError: (kind "unreadable_file") the file is missing, not JSON, or not a list.
    """
    file = str(input_path)
    root = Path(image_root) if image_root is not None else Path(file).parent
    for index, record in read_json_records(file):
        if isinstance(record, DataError):  # an undecodable JSONL line
            yield record
            continue
        try:
            yield _prompt(record, index, root)
        except MalformedRecord as err:
            yield DataError(file, index, err.kind, str(err))


def _strings(record: dict, key: str) -> list[str] | None:
    value = record.get(key)
    items = [value] if isinstance(value, str) else value
    if value is not None and not (isinstance(items, list) and items and all(isinstance(v, str) for v in items)):
        raise MalformedRecord(f"field {key!r} must be a string or a non-empty list of strings, got {value!r:.80}")
    return items


def _prompt(record: Any, index: int, root: Path) -> Prompt:
    if not isinstance(record, dict):
        raise MalformedRecord(f"a record must be a JSON object, got {type(record).__name__}")
    questions = _strings(record, "query") if "query" in record else _strings(record, "instruction")
    if not questions:
        raise MalformedRecord(f"no 'query' (or 'instruction') field; fields: {sorted(record)}")
    if "query" in record and len(questions) > 1:
        raise MalformedRecord("'query' must be one string")
    answers = (_strings(record, "output") or []) if len(questions) > 1 else []  # one turn: "output" is unused
    if len(answers) < len(questions) - 1:
        raise MalformedRecord(f"{len(questions)} instructions need {len(questions) - 1} or more outputs, "
                              f"got {len(answers)}")
    images = tuple(str(root / p) for p in _strings(record, "image") or [])
    markers = sum(q.count(IMAGE_MARKER) for q in questions)
    if markers not in (0, len(images)):
        raise MalformedRecord(f"{markers} {IMAGE_MARKER} markers but {len(images)} images", "marker_mismatch")
    for path in images:
        if not Path(path).is_file():
            raise MalformedRecord(f"image {path}: no such file", "missing_image")
    record_id = record.get("id", index)
    if isinstance(record_id, float) and not math.isfinite(record_id):  # the output line would not be JSON
        raise MalformedRecord(f"'id' must be a string or a finite number, got {record_id!r}")
    return Prompt(index=index, id=record_id, query=questions[-1], images=images,
                  history=tuple(zip(questions[:-1], answers, strict=False)))


def prompt_ids(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, prompt: Prompt,
               system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The prompt's token ids as the chat front ends render it: the system message, the turns, one
    `num_query_tokens` run of placeholders per image, and the template's header of a reply."""
    return render_with_template(tokenizer, prompt.messages(system_prompt), image_token_id=model.image_token_id,
                                num_query_tokens=model.num_query_tokens, add_generation_prompt=True).input_ids


def prompt_inputs(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, prompt: Prompt,
                  images: Sequence[Image.Image], system_prompt: str = DEFAULT_SYSTEM_PROMPT
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `GenerationScheduler.submit` takes for one prompt: its token ids [T] and its images' pixel values
    [N, 3, S, S] (the eval transform; None without images).

    Args:
        model: the model (placeholder token, query count, image size).
        tokenizer: its tokenizer.
        prompt: the prompt (its `images` only count the markers to place).
        images: its decoded images, in marker order.
        system_prompt: the system message.
    """
    ids = torch.tensor(prompt_ids(model, tokenizer, prompt, system_prompt))
    transform = ImageTransform(size=model.config.vision_config.image_size, train=False)
    return ids, torch.stack([transform(image) for image in images]) if images else None
