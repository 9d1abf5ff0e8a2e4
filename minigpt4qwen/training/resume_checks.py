"""What a resumed run must agree with, checked before (or right after) a checkpoint is loaded.

The data `Position` counts steps of one global batch over one data set: another batch size or another number of
samples would point it at other samples. The saved weights and optimizer groups must be those of the parts this run
trains. Every refusal names the file, what changed, and how to start a new run from the checkpoint's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import WEIGHTS_NAME
from minigpt4qwen.model.parts import PART_NAMES

logger = logging.getLogger(__name__)

# DeepSpeed checkpoints (ZeRO and pipeline) hold files named like this; ours hold WEIGHTS_NAME.
DEEPSPEED_FILES = "*model_states.pt"


@dataclass
class Position:
    """Where the run stands: optimizer steps done, and the data position (epoch, steps done in that epoch, in
    steps of `global_batch` samples, over `samples` training samples; those two are 0 in checkpoints written before
    they were recorded)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_steps: int = 0
    global_batch: int = 0
    samples: int = 0


def check_resumable(source: str | Path, saved: Position, global_batch: int, samples: int | None = None) -> None:
    """Refuses to resume a run whose data position counts steps of another global batch size or over another
    number of training samples (either points it at other samples: the epoch's order depends on both).

    Raises:
        CheckpointError: `saved` was written with a different global batch or sample count.
    """
    where = f"its data position (epoch {saved.epoch}, step {saved.step_in_epoch}) would point at other samples"
    if saved.global_batch and saved.global_batch != global_batch:
        raise CheckpointError(
            f"{source}: written by a run with {saved.global_batch} samples per optimizer step, this run has "
            f"{global_batch} (micro_batch_size x grad_accum x processes); {where}. Resume with the same global "
            f"batch, or {restart_hint(source)}")
    if samples is not None and saved.samples and saved.samples != samples:
        raise CheckpointError(
            f"{source}: written by a run over {saved.samples} training samples, this run has {samples} (did "
            f"data.datasets or their files change?); {where}. Resume with the same data, or {restart_hint(source)}")


def continue_position(source: str | Path, saved: Position, global_batch: int, samples: int,
                      steps_per_epoch: int) -> Position:
    """The position a resumed run continues from, after `check_resumable`.

    It records this run's global batch and sample count (older checkpoints lack them). A checkpoint that lacks
    the sample count may come from a run over more samples: a position at or past the end of this run's shorter
    epoch continues with the next epoch (logged), or the loop would never reach the epoch's end.
    """
    position = Position(**{**vars(saved), "global_batch": global_batch, "samples": samples})
    if position.step_in_epoch >= steps_per_epoch:
        logger.warning("%s: its position (epoch %d, step %d) lies past the end of this run's epochs of %d steps "
                       "(fewer samples than when it was written?); continuing with epoch %d", source, saved.epoch,
                       saved.step_in_epoch, steps_per_epoch, saved.epoch + 1)
        position.epoch, position.step_in_epoch = saved.epoch + 1, 0
    return position


def restart_hint(source: str | Path) -> str:
    """How to start a new run from a checkpoint's weights (a DeepSpeed one is converted first), as advice text."""
    source = Path(source)
    if source.is_dir() and any(source.glob(DEEPSPEED_FILES)):
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
        return next(iter(sorted(source.glob(DEEPSPEED_FILES))), source / WEIGHTS_NAME)
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
