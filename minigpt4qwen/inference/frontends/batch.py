"""Batch inference: a JSON list or JSONL of prompts with images -> JSONL of answers, in batches, with progress.

A record is `{"id"?, "image"?: path | [paths], "query": str}`; the original training format works too
(`"instruction": str | [str]` with `"output"`: earlier turns become the history, the last instruction is asked).
Relative image paths start from `image_root` (default: the input file's folder). Prompts are left-padded and
generated together; a bad record is reported with its file and index, then skipped or fatal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.formats import DataError, MalformedRecord, read_json_records
from minigpt4qwen.data.images import ImageLoadError, ImageTransform, load_image
from minigpt4qwen.inference.engine import IMAGE_PROMPT
from minigpt4qwen.inference.generation import GenerationSettings, chat_generate_kwargs, decode_reply
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


@dataclass
class BatchReport:
    """What `generate_file` did: answers written, and the bad records reported (with file and index)."""

    written: int = 0
    skipped: list[DataError] = field(default_factory=list)


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
        raise MalformedRecord(f"{len(questions)} instructions need {len(questions) - 1} or more outputs, got {len(answers)}")
    images = tuple(str(root / p) for p in _strings(record, "image") or [])
    markers = sum(q.count(IMAGE_MARKER) for q in questions)
    if markers not in (0, len(images)):
        raise MalformedRecord(f"{markers} {IMAGE_MARKER} markers but {len(images)} images", "marker_mismatch")
    for path in images:
        if not Path(path).is_file():
            raise MalformedRecord(f"image {path}: no such file", "missing_image")
    return Prompt(index=index, id=record.get("id", index), query=questions[-1], images=images,
                  history=tuple(zip(questions[:-1], answers, strict=False)))


@torch.no_grad()
def generate_batch(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                   images: Sequence[Sequence[Image.Image]], settings: GenerationSettings,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """Answers several prompts in one left-padded `generate` call (images encoded in one vision pass).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        prompts: the prompts.
        images: each prompt's decoded images, in marker order.
        settings: checked decoding options (one seed per call: sampled answers depend on the batch).
        system_prompt: the system message.

    Returns:
        One reply per prompt.
    """
    device = model.language_projection.weight.device
    rows = [render_with_template(tokenizer, p.messages(system_prompt), image_token_id=model.image_token_id,
                                 num_query_tokens=model.num_query_tokens, add_generation_prompt=True).input_ids
            for p in prompts]
    kwargs = chat_generate_kwargs(tokenizer, settings)
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), kwargs["pad_token_id"], dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: every prompt ends where generation starts
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    transform = ImageTransform(size=model.config.vision_config.image_size, train=False)
    flat = [transform(image) for group in images for image in group]
    features = model.encode_images(torch.stack(flat).to(device)) if flat else None
    new = model.generate(ids.to(device), attention_mask=mask.to(device), image_features=features, **kwargs)
    return [decode_reply(tokenizer, row, settings.stop) for row in new]


def generate_file(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, input_path: str | Path,
                  output_path: str | Path, settings: GenerationSettings | None = None, batch_size: int = 8, *,
                  image_root: str | Path | None = None, on_error: str = "skip",
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = True) -> BatchReport:
    """Answers every record of `input_path` and writes `{"id", "query", "answer"}` JSONL lines in input order
    (`query`: the question without its image markers); every skipped record also goes to `<output>.errors.jsonl`
    as `{"file", "index", "kind", "detail"}` (the file is removed when nothing was skipped).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        input_path: a JSON list or JSONL of prompts (see the module docstring).
        output_path: the JSONL written (replaced; lines are flushed batch by batch).
        settings: decoding options (greedy by default); the seed is applied once, before the first batch.
        batch_size: prompts per `generate` call.
        image_root: where relative image paths start (default: the input file's folder).
        on_error: "skip" reports a bad record on stderr and goes on; "fail" raises at the first one.
        system_prompt: the system message.
        progress: show a tqdm progress bar.

    Returns:
        The answers written and the records skipped.

    Raises:
        DataError: the input cannot be read, or (with on_error="fail") a bad record, named by file and index.
        ValueError: invalid settings, batch size or on_error.
    """
    settings = (settings or GenerationSettings()).check()
    if batch_size < 1 or on_error not in ("skip", "fail"):
        raise ValueError(f"batch_size must be >= 1 and on_error skip or fail (got {batch_size}, {on_error!r})")
    report = BatchReport()
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    errors_path = Path(f"{output_path}.errors.jsonl")
    errors_path.unlink(missing_ok=True)  # a previous run's errors do not describe this one
    prompts = []
    for item in read_prompts(input_path, image_root):  # every record is checked before any generation
        if isinstance(item, DataError):
            _bad(item, on_error, report, errors_path)
        else:
            prompts.append(item)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with open(output_path, "w", encoding="utf-8") as out, tqdm(total=len(prompts), disable=not progress,
                                                                 desc="generate", unit="prompt") as bar:
        for start in range(0, len(prompts), batch_size):
            batch, images = [], []
            for prompt in prompts[start:start + batch_size]:
                try:
                    images.append([load_image(path) for path in prompt.images])
                    batch.append(prompt)
                except ImageLoadError as err:
                    _bad(DataError(str(input_path), prompt.index, err.kind, f"image {err.path}: {err.detail}"),
                         on_error, report, errors_path)
            replies = generate_batch(model, tokenizer, batch, images, settings, system_prompt) if batch else []
            for prompt, reply in zip(batch, replies, strict=True):
                line = {"id": prompt.id, "query": prompt.question, "answer": reply}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            report.written += len(batch)
            bar.update(len(prompts[start:start + batch_size]))
    return report


def _bad(error: DataError, on_error: str, report: BatchReport, errors_path: Path) -> None:
    if on_error == "fail":
        raise error
    report.skipped.append(error)
    tqdm.write(f"[skipped] {error}", file=sys.stderr)
    with open(errors_path, "a", encoding="utf-8") as errors:  # appended as found: a crash later keeps them
        record = {"file": error.file, "index": error.index, "kind": error.kind, "detail": error.detail}
        errors.write(json.dumps(record, ensure_ascii=False) + "\n")


def generate_main(args: argparse.Namespace) -> int:
    """The `generate` subcommand: loads the model and runs `generate_file`.

    Args:
        args: the subcommand's options (input, output, model and generation options, --batch-size, ...).

    Returns:
        0, or 1 when records were given but none could be answered.

    Raises:
        DataError / ValueError / FileNotFoundError: bad input or options (reported by the CLI's main).
    """
    from minigpt4qwen.inference.loading import load_for_inference, settings_from_args

    settings = settings_from_args(args)
    model, tokenizer = load_for_inference(args)
    report = generate_file(model, tokenizer, args.input, args.output, settings, args.batch_size,
                           image_root=args.image_root, on_error=args.on_error,
                           system_prompt=args.system_prompt or DEFAULT_SYSTEM_PROMPT)
    skipped = len(report.skipped)
    listed = f", listed in {args.output}.errors.jsonl" if skipped else ""
    print(f"wrote {report.written} answer(s) to {args.output}; skipped {skipped} bad record(s){listed}")
    return 1 if report.skipped and not report.written else 0
