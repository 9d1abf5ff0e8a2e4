"""Batch inference: a JSON list or JSONL of prompts with images (`prompt_records`) -> JSONL of answers, with
progress. Every record is checked first; a bad one is reported with its file and index, then skipped or fatal.

The answers come from the generation scheduler (continuous batching, as `serve` answers): up to twice its slot
count of records are in flight, so a slot freed by a short answer is taken by the next record at once, and the
lines are written in input order as they complete. A record's answer is the one it gets alone (greedy; up to the
float rounding of batched matmuls). Sampling draws with a seed per record, derived from (the seed, the record's
index) by `record_seed`: a record's sampled answer depends neither on the other records nor on the slot count.
A record that fails in the scheduler (a prompt longer than a slot, an out-of-memory in its prefill) is skipped
and reported like a bad record. Beam search is not batched: its records run one at a time with
`MiniGPT4Qwen.generate` while the scheduler is paused (`model_lock`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.data.images import ImageLoadError, ImageTransform, load_image
from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.frontends.prompt_records import Prompt, prompt_ids, prompt_inputs, read_prompts
from minigpt4qwen.inference.generation import GenerationSettings, chat_generate_kwargs, decode_reply
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT


@dataclass
class BatchReport:
    """What `generate_file` did: answers written, and the bad records reported (with file and index)."""

    written: int = 0
    skipped: list[DataError] = field(default_factory=list)


def record_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of record `index` of a file generated with `seed` (None: None, a fresh draw each time).

    A hash, not `seed + index`, so that the files of seeds 1 and 2 do not share all but one record's draws.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # GenerationSettings takes seeds in [0, 2**63)


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
        settings: checked decoding options (torch's generator is not reseeded: sampled answers depend on the batch).
        system_prompt: the system message.

    Returns:
        One reply per prompt.
    """
    device = model.language_projection.weight.device
    rows = [prompt_ids(model, tokenizer, p, system_prompt) for p in prompts]
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


# What a record in flight has become: a request in the scheduler, a beam-search answer, or why it has none.
Outcome = GenerationHandle | str | DataError


def _ask(scheduler: GenerationScheduler, file: str, prompt: Prompt, settings: GenerationSettings,
         system_prompt: str) -> Outcome:
    """Decodes the record's images and submits it (beam search: answers it now, the scheduler paused)."""
    model, tokenizer = scheduler.model, scheduler.tokenizer
    try:
        images = [load_image(path) for path in prompt.images]
    except ImageLoadError as err:
        return DataError(file, prompt.index, err.kind, f"image {err.path}: {err.detail}")
    settings = dataclasses.replace(settings, seed=record_seed(settings.seed, prompt.index))
    try:
        if settings.num_beams > 1:
            with scheduler.model_lock:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                return generate_batch(model, tokenizer, [prompt], [images], settings, system_prompt)[0]
        ids, pixels = prompt_inputs(model, tokenizer, prompt, images, system_prompt)
        return scheduler.submit(ids, pixel_values=pixels, settings=settings)
    except (ValueError, torch.OutOfMemoryError) as err:  # e.g. a prompt longer than a slot: this record only
        return DataError(file, prompt.index, "generation_failed", f"{type(err).__name__}: {err}")


def _settle(outcome: Outcome, file: str, index: int) -> str | DataError:
    """The answer of a record in flight (waits for it), or why it has none."""
    if not isinstance(outcome, GenerationHandle):
        return outcome
    try:
        return outcome.result()
    except Exception as err:  # its prefill ran out of memory, ...: the scheduler and the other records go on
        return DataError(file, index, "generation_failed", f"{type(err).__name__}: {err}")


def generate_file(scheduler: GenerationScheduler, input_path: str | Path, output_path: str | Path,
                  settings: GenerationSettings | None = None, *, in_flight: int | None = None,
                  image_root: str | Path | None = None, on_error: str = "skip",
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = True) -> BatchReport:
    """Answers every record of `input_path` through `scheduler` and writes `{"id", "query", "answer"}` JSONL lines
    in input order (`query`: the question without its image markers); every skipped record also goes to
    `<output>.errors.jsonl` as `{"file", "index", "kind", "detail"}` (the file is removed when nothing was skipped).

    Args:
        scheduler: the model's generation scheduler (the caller closes it).
        input_path: a JSON list or JSONL of prompts (see the module docstring).
        output_path: the JSONL written (replaced; each line is flushed once it and every earlier one are done).
        settings: decoding options (greedy by default); a sampling seed becomes one seed per record (`record_seed`).
        in_flight: the most records submitted and not yet written (default: twice the scheduler's slots).
        image_root: where relative image paths start (default: the input file's folder).
        on_error: "skip" reports a bad or failed record on stderr and goes on; "fail" raises at the first one.
        system_prompt: the system message.
        progress: show a tqdm progress bar.

    Returns:
        The answers written and the records skipped.

    Raises:
        DataError: the input cannot be read, or (with on_error="fail") a bad or failed record, named by file and
            index.
        ValueError: invalid settings, in_flight or on_error.
        RuntimeError: the scheduler is closed.
    """
    settings = (settings or GenerationSettings()).check()
    in_flight = 2 * scheduler.slots if in_flight is None else in_flight
    if in_flight < 1 or on_error not in ("skip", "fail"):
        raise ValueError(f"in_flight must be >= 1 and on_error skip or fail (got {in_flight}, {on_error!r})")
    report, file = BatchReport(), str(input_path)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    errors_path = Path(f"{output_path}.errors.jsonl")
    errors_path.unlink(missing_ok=True)  # a previous run's errors do not describe this one
    prompts = []
    for item in read_prompts(input_path, image_root):  # every record is checked before any generation
        if isinstance(item, DataError):
            _bad(item, on_error, report, errors_path)
        else:
            prompts.append(item)
    pending: deque[tuple[Prompt, Outcome]] = deque()
    with open(output_path, "w", encoding="utf-8") as out, tqdm(total=len(prompts), disable=not progress,
                                                                 desc="generate", unit="prompt") as bar:
        def write_first() -> None:
            prompt, outcome = pending.popleft()
            answer = _settle(outcome, file, prompt.index)
            if isinstance(answer, DataError):
                _bad(answer, on_error, report, errors_path)
            else:
                out.write(json.dumps({"id": prompt.id, "query": prompt.question, "answer": answer},
                                     ensure_ascii=False) + "\n")
                out.flush()
                report.written += 1
            bar.update(1)

        try:
            for prompt in prompts:
                if len(pending) >= in_flight:
                    write_first()
                pending.append((prompt, _ask(scheduler, file, prompt, settings, system_prompt)))
            while pending:
                write_first()
        finally:  # stopped early (on_error="fail", an interrupt): free the slots of the records still in flight
            for _, outcome in pending:
                if isinstance(outcome, GenerationHandle):
                    outcome.cancel()
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
    """The `generate` subcommand: loads the model, starts its scheduler and runs `generate_file`.

    Args:
        args: the subcommand's options (input, output, model, scheduler and generation options, ...).

    Returns:
        0, or 1 when records were given but none could be answered.

    Raises:
        DataError / ValueError / FileNotFoundError: bad input or options (reported by the CLI's main).
    """
    from minigpt4qwen.inference.loading import load_for_inference, settings_from_args
    from minigpt4qwen.inference.scheduler_options import build_scheduler

    settings = settings_from_args(args)
    scheduler = build_scheduler(*load_for_inference(args), args)
    try:
        report = generate_file(scheduler, args.input, args.output, settings, image_root=args.image_root,
                               on_error=args.on_error, system_prompt=args.system_prompt or DEFAULT_SYSTEM_PROMPT)
    finally:
        scheduler.close()
    skipped = len(report.skipped)
    listed = f", listed in {args.output}.errors.jsonl" if skipped else ""
    print(f"wrote {report.written} answer(s) to {args.output}; skipped {skipped} bad record(s){listed}")
    return 1 if report.skipped and not report.written else 0
