"""Where a run reports to: a JSONL file (always), TensorBoard and wandb (optional), plus the files that make a
run directory self-describing (its config and the software/hardware environment).

Only the main process writes; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


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
        self._file = open(output_dir / METRICS_NAME, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed (pip install 'minigpt4qwen[train]'); logging to JSONL only")
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

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def environment() -> dict:
    """Versions and hardware of this run, for `environment.json`."""
    versions = {}
    for package in ("minigpt4qwen", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
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
