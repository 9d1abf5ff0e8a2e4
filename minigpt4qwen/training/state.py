"""Training checkpoints: weights (native format) + everything needed to continue a run exactly.

`output_dir/checkpoint-00001200/` holds `model.safetensors` + `minigpt4qwen.json` (loadable like any native
checkpoint) and `training_state.pt` (optimizer, scheduler, scaler, per-rank RNG states, data position). The
directory is written atomically, so a killed save leaves only a `.tmp-` directory that `find_latest` ignores and
`remove_interrupted_saves` deletes when the next run starts.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import (
    WEIGHTS_NAME,
    read_native_checkpoint,
    remove_interrupted_writes,
    save_checkpoint,
)
from minigpt4qwen.model.parts import PART_NAMES

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
_CKPT_PATTERN = r"checkpoint-(\d+)"
_CKPT_RE = re.compile(rf"^{_CKPT_PATTERN}$")
# DeepSpeed checkpoints (ZeRO and pipeline) hold files named like this; ours hold WEIGHTS_NAME.
_DEEPSPEED_FILES = "*model_states.pt"


@dataclass
class Position:
    """Where the run stands: optimizer steps done, and the data position (epoch, steps done in that epoch, in
    steps of `global_batch` samples; 0 in checkpoints written before it was recorded)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_steps: int = 0
    global_batch: int = 0


def check_resumable(source: str | Path, saved: Position, global_batch: int) -> None:
    """Refuses to resume a run whose data position counts steps of another global batch size.

    Raises:
        CheckpointError: `saved` was written with a different global batch.
    """
    if saved.global_batch and saved.global_batch != global_batch:
        raise CheckpointError(
            f"{source}: written by a run with {saved.global_batch} samples per optimizer step, this run has "
            f"{global_batch} (micro_batch_size x grad_accum x processes); its data position (epoch {saved.epoch}, "
            f"step {saved.step_in_epoch}) would point at other samples. Resume with the same global batch, or "
            f"{restart_hint(source)}")


def restart_hint(source: str | Path) -> str:
    """How to start a new run from a checkpoint's weights (a DeepSpeed one is converted first), as advice text."""
    source = Path(source)
    if source.is_dir() and any(source.glob(_DEEPSPEED_FILES)):
        native = source.with_name(f"{source.name}-native")
        return (f"convert it and start a new run from its weights: minigpt4qwen convert {source} {native}, then "
                f"train with model.checkpoint={native} train.resume=none")
    return f"start a new run from its weights: model.checkpoint={source} train.resume=none"


def _parts(names: Iterable[str]) -> list[str]:
    """The model parts of weight names or of optimizer group names ("language_model/decay"), in model order."""
    present = {name.split("/", 1)[0].split(".", 1)[0] for name in names}
    return [part for part in PART_NAMES if part in present]


def _weights_file(source: Path) -> Path:
    """The file of a checkpoint directory that holds its weights, to name in errors."""
    if source.is_dir():
        return next(iter(sorted(source.glob(_DEEPSPEED_FILES))), source / WEIGHTS_NAME)
    return source


def check_trained_keys(source: str | Path, keys: Iterable[str], model: nn.Module, *, trained_only: bool = True) -> None:
    """Checks that a checkpoint's weight names are exactly what a resumed run trains (plus other model tensors).

    Args:
        source: the checkpoint (named in errors).
        keys: its weight names.
        model: the model of the resumed run, trainable flags set.
        trained_only: the checkpoint holds the weights its run trained and nothing else (DeepSpeed's
            `exclude_frozen_parameters`), so a weight that is frozen here means that this run trains fewer parts.

    Raises:
        CheckpointError: trainable weights missing from it, weights the model does not have, or (trained_only)
            trained weights that this run freezes.
    """
    keys, state = set(keys), model.state_dict(keep_vars=True)
    params = {k for k, v in state.items() if isinstance(v, nn.Parameter)}
    trainable = {k for k in params if state[k].requires_grad}
    missing, unexpected = sorted(trainable - keys), sorted(keys - set(state))
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} trainable weights, e.g. {missing[:3]} (were other "
                              "parts trainable when it was written? see model.trainable)")
    if unexpected:
        raise CheckpointError(f"{source}: holds {len(unexpected)} weights the model does not have, e.g. "
                              f"{unexpected[:3]}")
    frozen = sorted((keys & params) - trainable)
    if trained_only and frozen:
        source = Path(source)
        raise CheckpointError(
            f"{_weights_file(source)}: written by a run that trained the parts {_parts(keys & params)}, this run "
            f"trains {_parts(trainable)} ({len(frozen)} of its weights are frozen here, e.g. {frozen[:2]}), so its "
            f"optimizer state does not fit. Resume with the same model.trainable, or {restart_hint(source)}")


def check_param_groups(file: str | Path, saved: list[dict], optimizer: torch.optim.Optimizer, hint: str) -> None:
    """Checks that a saved optimizer state has this run's parameter groups (names and sizes) before it is loaded.

    Args:
        file: the file the state comes from (named in the error).
        saved: the saved `optimizer.state_dict()["param_groups"]`.
        optimizer: this run's optimizer (groups named "part/decay" by `optim.param_groups`).
        hint: what else the user can do (see `restart_hint`).

    Raises:
        CheckpointError: other groups, e.g. a checkpoint of a run that trained other parts.
    """
    names = [[g.get("name", "") for g in groups] for groups in (saved, optimizer.param_groups)]
    sizes = [[len(g["params"]) for g in groups] for groups in (saved, optimizer.param_groups)]
    if names[0] == names[1] and sizes[0] == sizes[1]:
        return
    if names[0] == names[1]:
        detail = f"the groups {names[0]} with {sizes[0]} tensors, this run's have {sizes[1]} (train.lora changed?)"
    elif all(names[0]) and all(names[1]):
        detail = f"the parts {_parts(names[0])}, this run trains {_parts(names[1])} (model.trainable changed?)"
    else:  # groups of an optimizer built elsewhere carry no names
        detail = f"{len(saved)} parameter groups, this run has {len(optimizer.param_groups)}"
    raise CheckpointError(f"{file}: its optimizer state is for {detail}. Resume with the trainable parts it was "
                          f"written with, or {hint}")


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores the states captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save_training_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    position: Position,
    rng_states: list[dict],
    *,
    contents: str = "trainable",
    extra: dict | None = None,
) -> Path:
    """Writes a resumable checkpoint atomically (call on the main process only).

    Args:
        directory: the checkpoint directory (replaced if it exists).
        model: the unwrapped model.
        optimizer, scheduler, scaler: their states are saved (scaler may be None).
        position: global step and data position.
        rng_states: every rank's `rng_state()`, in rank order.
        contents: "trainable" or "all" weights.
        extra: JSON-serialisable information for the description file (e.g. the last loss).

    Returns:
        The directory.
    """
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "position": asdict(position),
        "rng": rng_states,
    }
    return save_checkpoint(model, directory, which=contents, extra={**asdict(position), **(extra or {})},
                           write_more=lambda tmp: torch.save(state, tmp / STATE_NAME))


def remove_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Deletes the `.checkpoint-N.tmp-` directories of saves that were killed midway (call before a run starts).

    Returns:
        The directories removed (each is logged).
    """
    return remove_interrupted_writes(output_dir, _CKPT_PATTERN)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (`.tmp-` leftovers of killed saves are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CKPT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_NAME).is_file() and (child / WEIGHTS_NAME).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """Turns the `train.resume` setting into a checkpoint path (or None to start fresh).

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(output_dir)
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: no {STATE_NAME} there (not a training checkpoint)")
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Deletes all but the newest `keep_last` checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_training_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    global_batch: int | None = None,
) -> Position:
    """Restores weights, optimizer, scheduler, scaler and this rank's RNG state; returns the position.

    Args:
        global_batch: this run's samples per optimizer step, checked against the checkpoint's before anything
            is loaded (None: not checked).

    Raises:
        CheckpointError: unreadable files, saved weights or optimizer groups that do not match the model's
            trainable parameters (e.g. fewer trainable parts now), or another global batch size.
    """
    directory = Path(directory)
    tensors = read_native_checkpoint(directory)
    try:
        state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated pickle raises many different types
        raise CheckpointError(f"{directory / STATE_NAME}: unreadable training state ({err})") from None
    position = Position(**state["position"])
    if global_batch is not None:
        check_resumable(directory, position, global_batch)
    # Native checkpoints may hold all weights (train.save_contents=all): the optimizer's groups tell what was trained.
    check_trained_keys(directory, tensors, model, trained_only=False)
    check_param_groups(directory / STATE_NAME, state["optimizer"]["param_groups"], optimizer, restart_hint(directory))
    model.load_state_dict(tensors, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    configured = scheduler.state_dict().get("lr_lambdas")
    scheduler.load_state_dict(state["scheduler"])
    if state["scheduler"].get("lr_lambdas") != configured:
        # LambdaLR restores the saved schedule object; a run resumed with a new max_steps / warmup / lr range
        # (e.g. extended) follows the new schedule from the current step instead.
        scheduler.lr_lambdas[0].__dict__.update(configured[0])
        logger.warning("%s: the schedule changed since this checkpoint (%s -> %s); continuing on the new one",
                       directory, state["scheduler"].get("lr_lambdas"), configured)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    # A run resumed on more processes than it was saved with reuses rank 0's state for the new ranks.
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return position
