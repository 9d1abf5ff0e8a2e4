"""Asking a benchmark's questions: predictions are appended to a JSONL file batch by batch, so a killed run
rerun with the same command continues where it stopped and ends with the same results.

The questions are cut into fixed batches; a batch missing any answer is answered again whole (a batch's answers
never depend on where an earlier run stopped: the answerer's answers depend only on the batch). Images of the next
batch are decoded and resized on worker threads while the current batch is generated. A question whose image
cannot be decoded, or whose generation failed, is skipped and reported (a rerun asks its batch again).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.data.images import ImageLoadError
from minigpt4qwen.evaluation.answering import Answerer, Request
from minigpt4qwen.evaluation.benchmarks import Benchmark
from minigpt4qwen.evaluation.prompts import render
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, open_image, unique_keys
from minigpt4qwen.evaluation.report import build_results, write_results

PREDICTIONS = "predictions.jsonl"
RUN = "run.json"


@dataclass
class Predictions:
    """What `predict` did.

    Attributes:
        answers: raw answer by question key, for every question answered (in this run or an earlier one).
        skipped: questions whose image could not be decoded, or whose generation failed.
        answered_now: questions answered by this run.
        seconds: time spent answering them.
    """

    answers: dict[str, str]
    skipped: list[DataError] = field(default_factory=list)
    answered_now: int = 0
    seconds: float = 0.0


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """The predictions of earlier runs by key (a later line wins); a torn last line, left by a run killed while
    writing, is cut off the file.

    Raises:
        ValueError: a complete line that is not a prediction (names the file and line).
    """
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw.rfind(b"\n") + 1
    if complete < len(raw):
        with open(path, "r+b") as f:
            f.truncate(complete)
    records = {}
    for number, line in enumerate(raw[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record.get("key"), str) or not isinstance(record.get("answer"), str):
                raise ValueError("needs a string 'key' and 'answer'")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{path}: line {number} is not a prediction ({err}); remove the file to start over") \
                from None
        records[record["key"]] = record
    return records


def check_run(out_dir: Path, run: dict[str, Any]) -> None:
    """Records what a run is (benchmark, data, model, settings) in `out_dir/run.json`, or checks that the earlier
    run there was the same, so that predictions of different runs never mix.

    Raises:
        ValueError: the earlier run differs (the message names what differs).
    """
    path = out_dir / RUN
    if path.exists() and (out_dir / PREDICTIONS).exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err}); delete it to resume these predictions with this run's "
                             "settings, or delete the folder to start over") from None
        differ = sorted(k for k in set(earlier) | set(run) if earlier.get(k) != run.get(k))
        if differ:
            raise ValueError(f"{out_dir} holds predictions of another run ({', '.join(differ)} differ: "
                             f"{ {k: earlier.get(k) for k in differ} } there): choose another --output-dir, or "
                             f"delete {out_dir / PREDICTIONS} to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # replaced whole: a kill never leaves half a record
    partial.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _load(question: Question, size: int) -> Image.Image:
    # The same bicubic resize the model's eval transform applies, done here so that it runs off the main thread
    # (the transform's own resize of an image already this size is a copy).
    image = open_image(question.image, f"{question.where[0]}: record {question.where[1]}")
    return image.resize((size, size), Image.Resampling.BICUBIC)


def predict(questions: Sequence[Question], answerer: Answerer, template: str, path: Path, *,
            parse: Callable[[Question, str], Any], batch_size: int = 16, desc: str = "eval",
            progress: bool = True, workers: int = 8) -> Predictions:
    """Answers every question not answered yet and appends `{"key", "prompt", "answer", "parsed"}` lines.

    Args:
        questions: in their fixed order.
        answerer: answers a batch.
        template: the prompt template.
        path: the predictions JSONL (created, or continued).
        parse: the benchmark's answer reader, for the "parsed" field.
        batch_size: questions per batch.
        desc: the progress bar's label.
        progress: show the progress bar (questions/s and time left).
        workers: threads decoding images.

    Returns:
        The answers, the questions skipped for a bad image, and the speed.

    Raises:
        ValueError: a bad batch size, or two questions with one key (the readers drop repeats: `unique_keys`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_keys(questions)
    done = read_predictions(path)
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    todo = [b for b in batches if any(q.key not in done for q in b)]
    result = Predictions(answers={})
    start = time.perf_counter()
    bar = tqdm(total=len(questions), initial=len(questions) - sum(len(b) for b in todo), unit="q", desc=desc,
               disable=not progress, smoothing=0.1)
    with ThreadPoolExecutor(workers) as pool, open(path, "a", encoding="utf-8") as out, bar:
        def submit(batch: Sequence[Question]) -> list[Future]:
            return [pool.submit(_load, q, answerer.image_size) for q in batch]

        upcoming = submit(todo[0]) if todo else []
        for i, batch in enumerate(todo):
            loading, upcoming = upcoming, (submit(todo[i + 1]) if i + 1 < len(todo) else [])
            asked, requests = [], []
            for question, future in zip(batch, loading, strict=True):
                try:
                    requests.append(Request(render(template, question), (future.result(),)))
                    asked.append(question)
                except ImageLoadError as err:
                    _skip(DataError(*question.where, err.kind, f"image {err.path}: {err.detail}"), result)
            replies = answerer.answer(requests) if requests else []
            lines = []
            for question, request, reply in zip(asked, requests, replies, strict=True):
                if isinstance(reply, Exception):
                    _skip(DataError(*question.where, "generation_failed", f"{type(reply).__name__}: {reply}"), result)
                    continue
                done[question.key] = {"key": question.key, "prompt": request.text, "answer": reply,
                                      "parsed": parse(question, reply)}
                lines.append(json.dumps(done[question.key], ensure_ascii=False) + "\n")
            out.write("".join(lines))  # one write per batch: a kill leaves at most one torn line
            out.flush()
            result.answered_now += len(lines)
            bar.update(len(batch))
    result.seconds = time.perf_counter() - start
    result.answers = {q.key: done[q.key]["answer"] for q in questions if q.key in done}
    return result


def _check_keys(questions: Sequence[Question]) -> None:
    # Answers are stored and looked up by key: a second question of a key would be scored with the first's answer.
    repeats: list[DataError] = []
    unique_keys(questions, repeats)
    if repeats:
        raise ValueError(str(repeats[0]))


def _skip(error: DataError, result: Predictions) -> None:
    result.skipped.append(error)
    tqdm.write(f"[skipped] {error}", file=sys.stderr)


def evaluate(benchmark: Benchmark, data: BenchmarkData, data_path: str, out_dir: Path, answerer: Answerer, *,
             template: str, settings: dict[str, Any], model: dict[str, Any], batch_size: int = 16,
             progress: bool = True) -> tuple[dict[str, Any], Predictions]:
    """Asks every question (resuming `out_dir/predictions.jsonl`), scores the answers, writes results.json and
    results.md into `out_dir`.

    Args:
        benchmark: the benchmark.
        data: its questions, as read.
        data_path: where they were read from (recorded).
        out_dir: where predictions and results go.
        answerer: answers batches.
        template: the (checked) prompt template.
        settings: the answering settings to record (template, system prompt, max_new_tokens, ...).
        model: what identifies the model (recorded, and checked on resume).
        batch_size: questions per batch.
        progress: show the progress bar.

    Returns:
        The results document and what answering did.

    Raises:
        ValueError: `out_dir` holds predictions of another run.
    """
    check_run(out_dir, {"benchmark": benchmark.name, "data": data_path, "model": model, "settings": settings})
    made = predict(data.questions, answerer, template, out_dir / PREDICTIONS, parse=benchmark.parse,
                   batch_size=batch_size, desc=benchmark.name, progress=progress)
    scores = benchmark.score(data.questions, made.answers)
    skipped = [*data.skipped, *made.skipped]
    results = build_results(benchmark.name, data_path, model, settings, data.total, len(made.answers), skipped,
                            scores, ("pycocoevalcap",) if benchmark.name == "caption" else ())
    write_results(results, out_dir)
    return results, made
