"""Our own checkpoints: safetensors of the chosen parameters (trainable ones by default) + a JSON description.

A checkpoint directory holds `model.safetensors` and `minigpt4qwen.json`; a projection-only checkpoint of a 7B
model is ~17 MB. Directories are written atomically: a crash mid-write never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minigpt4qwen.checkpoint.keymap import CheckpointError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
META_NAME = "minigpt4qwen.json"
FORMAT_VERSION = 1
# `atomic_directory` writes into `.{final name}.tmp-XXXXXXXX` (tempfile.mkdtemp's 8 random characters).
TMP_INFIX = ".tmp-"
_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces `final` in one rename.

    If the block raises (or the process dies), `final` is untouched and the partial directory is removed (or,
    after a hard kill, left with a `.tmp-` name that loaders ignore and `remove_interrupted_writes` deletes).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_INFIX}", dir=final.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_interrupted_writes(parent: str | Path, name_pattern: str) -> list[Path]:
    """Deletes what `atomic_directory` left in `parent` when its process was killed mid-write (logged).

    Call it only when nothing writes into `parent`, e.g. when a run starts.

    Args:
        parent: the directory the writes went to.
        name_pattern: a regular expression the final directory's name must match in full (e.g.
            `checkpoint-\\d+`), so that only these temporary directories are touched.

    Returns:
        The directories removed.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    ours = re.compile(rf"\.(?:{name_pattern}){re.escape(TMP_INFIX)}{_MKDTEMP_SUFFIX}")
    removed = []
    for child in sorted(parent.iterdir()):
        if ours.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
            logger.warning("removing %s: an unfinished checkpoint write (its process was stopped mid-save)", child)
            shutil.rmtree(child)
            removed.append(child)
    return removed


def select_state_dict(model: nn.Module, which: str = "trainable") -> dict[str, torch.Tensor]:
    """The tensors to save: 'trainable' (requires_grad parameters) or 'all'.

    Names come from `state_dict()` so they are the stable, wrapper-free names (e.g. activation-checkpoint
    wrappers strip their prefix there).
    """
    if which not in ("trainable", "all"):
        raise ValueError(f"which must be 'trainable' or 'all', not {which!r}")
    tensors = model.state_dict(keep_vars=True)
    if which == "trainable":
        tensors = {k: v for k, v in tensors.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_checkpoint(model: nn.Module, directory: str | Path, *, which: str = "trainable", extra: dict | None = None,
                    write_more: Callable[[Path], None] | None = None) -> Path:
    """Writes `model`'s chosen tensors and a description to `directory` (atomically).

    Args:
        model: the model (a `MiniGPT4Qwen`, possibly with checkpoint wrappers).
        directory: target directory; replaced if it exists.
        which: 'trainable' (default) or 'all'.
        extra: JSON-serialisable information to record (e.g. step, config).
        write_more: writes further files into the (temporary) directory before it is published, so they
            appear atomically with the weights (e.g. the trainer's optimizer state).

    Returns:
        The directory path.
    """
    tensors = select_state_dict(model, which)
    if not tensors:
        raise ValueError("nothing to save: no parameter requires grad (use which='all')")
    meta = {"format": "minigpt4qwen", "version": FORMAT_VERSION, "contents": which, "keys": len(tensors),
            "lora": lora_description(model), **(extra or {})}
    with atomic_directory(directory) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
        if write_more is not None:
            write_more(tmp)
    return Path(directory)


def lora_description(model: nn.Module) -> dict | None:
    """The LoRA settings of a peft-wrapped LLM (needed to rebuild the adapters a checkpoint's keys refer to)."""
    peft_config = getattr(getattr(model, "language_model", None), "peft_config", None)
    if not peft_config:
        return None
    lora = peft_config["default"]
    return {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
            "target_modules": sorted(lora.target_modules)}


def read_native_meta(path: str | Path) -> dict:
    """The JSON description of a `save_checkpoint` directory.

    Raises:
        CheckpointError: missing or unreadable description, or an unknown format version.
    """
    meta_file = Path(path) / META_NAME
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_file}: unreadable checkpoint description ({err})") from None
    if meta.get("format") != "minigpt4qwen" or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: not a minigpt4qwen checkpoint of version <= {FORMAT_VERSION}: {meta}")
    return meta


def is_native_checkpoint(path: str | Path) -> bool:
    """A directory written by `save_checkpoint`."""
    return (Path(path) / META_NAME).is_file()


def read_native_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads the tensors of a `save_checkpoint` directory (composite key names).

    Raises:
        CheckpointError: missing or corrupt files, or an unknown format version.
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME
    read_native_meta(path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} is missing (the checkpoint was not completely written?)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({err})") from None
