"""Training checkpoints: weights (native format) + everything needed to continue a run exactly.

`output_dir/checkpoint-00001200/` holds `model.safetensors` + `minigpt4qwen.json` (loadable like any native
checkpoint) and `training_state.pt` (optimizer, scheduler, scaler, per-rank RNG states, data position). The
directory is written atomically, so a killed save leaves only a `.tmp-` directory that `find_latest` ignores and
`remove_interrupted_saves` deletes when the next run starts. A run resumed from an older checkpoint renames the
newer ones `checkpoint-N.abandoned` (`set_aside_newer`), out of the way of `train.resume=auto` and pruning.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import asdict
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
from minigpt4qwen.training.optim import configured_settings, restore_configured_settings
from minigpt4qwen.training.resume_checks import (
    Position,
    check_param_groups,
    check_resumable,
    check_trained_keys,
    restart_hint,
)

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
_CKPT_PATTERN = r"checkpoint-(\d+)"
_CKPT_RE = re.compile(rf"^{_CKPT_PATTERN}$")
ABANDONED_SUFFIX = ".abandoned"


# What numpy's RNG state (a uint32 array) needs besides tensors and plain containers (torch's documented allowlist).
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # renamed in numpy 2
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _NUMPY_CORE.multiarray._reconstruct]


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


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Renames the checkpoints of `output_dir` newer than `step` to `checkpoint-N.abandoned` (logged).

    A run resumed from an older checkpoint (a roll-back) starts another history: the newer checkpoints of the old
    one must not be what `train.resume=auto` picks after a restart, nor what pruning keeps instead of the new ones.
    They are kept under the new name, not deleted: they may be the better weights. Call on the main process only.

    Returns:
        The new paths.
    """
    moved = []
    for path in Path(output_dir).iterdir() if Path(output_dir).is_dir() else ():
        match = _CKPT_RE.match(path.name)
        if not (match and path.is_dir() and int(match.group(1)) > step):
            continue
        target, n = path.with_name(path.name + ABANDONED_SUFFIX), 1
        while target.exists():  # an earlier roll-back abandoned the same step
            target, n = path.with_name(f"{path.name}{ABANDONED_SUFFIX}-{n}"), n + 1
        path.rename(target)
        logger.warning("%s is newer than the resumed step %d: renamed to %s, so that train.resume=auto and "
                       "train.keep_last ignore it (delete it once it is not needed)", path, step, target.name)
        moved.append(target)
    return sorted(moved)


def load_training_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    global_batch: int | None = None,
    samples: int | None = None,
) -> Position:
    """Restores weights, optimizer, scheduler, scaler and this rank's RNG state; returns the position.

    The optimizer settings (lr, weight decay, betas, per-part lr multipliers) and the schedule stay the ones
    `optimizer` and `scheduler` were built with: the checkpoint contributes the moments and the step count only.

    Args:
        global_batch: this run's samples per optimizer step, checked against the checkpoint's before anything
            is loaded (None: not checked).
        samples: this run's training samples per epoch, checked likewise (None: not checked).

    Raises:
        CheckpointError: unreadable files, saved weights or optimizer groups that do not match the model's
            trainable parameters (e.g. fewer trainable parts now), another global batch size or sample count.
    """
    directory = Path(directory)
    tensors = read_native_checkpoint(directory)
    try:
        # Weights-only, as every other file we read: numpy's array type is allowed for the RNG state it holds.
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated pickle raises many different types
        raise CheckpointError(f"{directory / STATE_NAME}: unreadable training state ({err})") from None
    position = Position(**state["position"])
    if global_batch is not None:
        check_resumable(directory, position, global_batch, samples)
    # Native checkpoints may hold all weights (train.save_contents=all): the optimizer's groups tell what was trained.
    check_trained_keys(directory, tensors, model, trained_only=False)
    check_param_groups(directory / STATE_NAME, state["optimizer"]["param_groups"], optimizer, restart_hint(directory))
    model.load_state_dict(tensors, strict=False)
    configured = configured_settings(optimizer, scheduler)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_configured_settings(optimizer, scheduler, configured, source=directory)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    # A run resumed on more processes than it was saved with reuses rank 0's state for the new ranks.
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return position
