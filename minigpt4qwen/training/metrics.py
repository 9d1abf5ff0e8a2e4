"""Where a run reports to: a JSONL file (always), TensorBoard and wandb (optional), plus the files that make a
run directory self-describing (its config and the software/hardware environment), and the report of what the
data layer truncated, dropped or skipped.

Only the main process writes; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch

from minigpt4qwen.training.distributed import all_gather_objects

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
# Distinct records named by the end-of-run data summary record (the log names fewer); all are counted.
MAX_LISTED_RECORDS = 1000
MAX_LOGGED_RECORDS = 20
_TAIL_BYTES = 1 << 16


class MetricsLogger:
    """Appends records to `output_dir/metrics.jsonl` and mirrors scalars to TensorBoard / wandb.

    Args:
        output_dir: the run directory.
        enabled: False on non-main ranks (every call is then a no-op).
        tensorboard: also write TensorBoard event files under `output_dir/tensorboard`.
        wandb: also log to Weights & Biases (the `wandb` package must be installed and configured).
        run_name: the wandb run name.

    Raises:
        ImportError: wandb requested but not installed.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, run_name: str | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.last_logged_step = _last_step(output_dir / METRICS_NAME)
        self._file = open(output_dir / METRICS_NAME, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed (pip install 'minigpt4qwen[train]'); JSONL only")
            else:
                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ImportError("train.wandb=true needs the wandb package: pip install wandb") from None
            self._wandb = wandb_module.init(project="minigpt4qwen", name=run_name, dir=str(output_dir))

    def log(self, record: dict, step: int) -> None:
        """Writes one record (a JSON line) and its numeric fields as scalars at `step`."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        kind = record.get("kind", "train")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def mark_resume(self, step: int, **fields: object) -> None:
        """Writes `{"event": "resume", "step": step, ...}`: the records after it continue from checkpoint step
        `step`, so earlier records of steps after `step` (`last_logged_step` says up to where) belong to the
        interrupted run and are repeated, not duplicated."""
        if not self.enabled:
            return
        record = {"event": "resume", "step": step, "time": round(time.time(), 3),
                  "last_logged_step": self.last_logged_step, **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _last_step(path: Path) -> int | None:
    """The largest "step" among the last records of an existing metrics file (None: no file or no step)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut by the seek or by a kill
            continue
    return max(steps, default=None)


class DataReport:
    """What the data layer did to the samples of a run: truncated, dropped (too long, nothing to learn) or
    skipped (bad records and images under data.bad_sample_policy=skip) ones, counted and named, never silent.

    Batches of `ConversationDataset` items carry `events` (name -> count) and `problems` (one message per event,
    naming file and record). Each step with events gets a log line and a "data" record in metrics.jsonl (this
    process's batches); `finish` writes the run's totals over all processes and the records concerned.

    Args:
        metrics: the run's logger (only the main process's writes).
        load_problems: records skipped while the annotation files were read (the dataset's `load_problems`).
        rank: this process's data-parallel rank (pipeline stages of one replica read the same batches).
    """

    def __init__(self, metrics: MetricsLogger, load_problems: Iterable[Exception] = (), rank: int = 0):
        self.metrics, self.rank = metrics, rank
        self.counts: Counter[str] = Counter()
        self.records: Counter[str] = Counter()  # message -> times seen (epochs and weights repeat records)
        self.load_problems = [str(problem) for problem in load_problems]
        if self.load_problems and metrics.enabled:
            logger.warning("%d records skipped while reading the annotations: %s", len(self.load_problems),
                           "; ".join(self.load_problems[:MAX_LOGGED_RECORDS]))

    def observe(self, batches: Iterable[object], step: int) -> None:
        """Counts, logs and records the events of one optimizer step's batches (non-dict batches carry none)."""
        events: Counter[str] = Counter()
        messages: list[str] = []
        for batch in batches:
            if isinstance(batch, dict):
                events.update(batch.get("events", {}))
                messages += batch.get("problems", [])
        if not events:
            return
        self.counts.update(events)
        self.records.update(messages)
        lost = any(not name.startswith("truncated") for name in events)
        listed = "".join(f"\n  {message}" for message in messages)
        (logger.warning if lost else logger.info)("data, step %d: %s%s", step, _describe(events), listed)
        self.metrics.log({"kind": "data", **events, "records": messages}, step)

    def finish(self, step: int) -> dict[str, int]:
        """Sums every process's counts and writes the run's summary: a log block and a "data_summary" record.

        Collective: call on every process, at the same point.

        Returns:
            The counts of the whole run (every process), by event name.
        """
        counts: Counter[str] = Counter()
        records: Counter[str] = Counter()
        ranks = set()
        for rank, rank_counts, rank_records in all_gather_objects((self.rank, self.counts, self.records)):
            if rank not in ranks:  # one report per data-parallel replica
                ranks.add(rank)
                counts.update(rank_counts)
                records.update(rank_records)
        if not self.metrics.enabled:
            return dict(counts)
        names = [*self.load_problems, *records]
        summary = _describe(counts) or "no sample truncated, dropped or skipped"
        if self.load_problems:
            summary += f"; skipped while reading the annotations: {len(self.load_problems)}"
        listed = "".join(f"\n  {name}" for name in names[:MAX_LOGGED_RECORDS])
        if len(names) > MAX_LOGGED_RECORDS:
            listed += (f"\n  ... and {len(names) - MAX_LOGGED_RECORDS} more (the data_summary record of "
                       f"{METRICS_NAME} lists {MAX_LISTED_RECORDS})")
        (logger.warning if names else logger.info)("data, whole run: %s%s", summary, listed)
        self.metrics.log({"kind": "data_summary", "counts": dict(counts), "load_skipped": len(self.load_problems),
                          "records": names[:MAX_LISTED_RECORDS], "records_total": len(names)}, step)
        return dict(counts)


def _describe(counts: Counter[str]) -> str:
    """Event counts grouped as "truncated: truncated_answer 3; dropped: dropped_too_long 1" ("" for none)."""
    parts = []
    for verb in ("truncated", "dropped", "skipped"):
        mine = [f"{name} {n}" for name, n in sorted(counts.items()) if name.startswith(verb)]
        if mine:
            parts.append(f"{verb}: {', '.join(mine)}")
    return "; ".join(parts)


def environment() -> dict:
    """Versions and hardware of this run, for `environment.json`."""
    versions = {}
    for package in ("minigpt4qwen", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
    }


def write_run_files(output_dir: str | Path, config_yaml: str | None, extra: dict | None = None) -> None:
    """Saves `config.yaml` (when given) and `environment.json` beside the checkpoints."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        (output_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    (output_dir / "environment.json").write_text(json.dumps({**environment(), **(extra or {})}, indent=2))
