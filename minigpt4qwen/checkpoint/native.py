"""Our own checkpoints: safetensors of the chosen parameters (trainable ones by default) + a JSON description.

A checkpoint directory holds `model.safetensors` and `minigpt4qwen.json`; a projection-only checkpoint of a 7B
model is ~17 MB. Directories are written atomically: a crash mid-write never replaces a good checkpoint.
A tensor that several keys share (an LLM's output head tied to its input embeddings) is stored once, under its
first key; the description lists the others (`tied`), and reading restores them as the same tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
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
TIED_KEY = "tied"  # in the description: {alias key: the key its tensor is stored under}
# `atomic_directory` writes into `.{final name}.tmp-XXXXXXXX` (8 random characters), and moves a directory it
# replaces to `.{final name}.old-PID` until the new one is in place.
TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"
_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"  # also what tempfile.mkdtemp, used before, left


def _make_temporary_sibling(final: Path) -> Path:
    """Creates `.{final.name}.tmp-XXXXXXXX` next to `final` with the permissions of any new directory.

    `tempfile.mkdtemp` would create it 0700, and the published checkpoint would keep that: unreadable to the
    group that reads the run's other files. `os.mkdir` applies the umask as for any other directory.
    """
    for _ in range(100):
        tmp = final.with_name(f".{final.name}{TMP_INFIX}{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary directory name next to {final}")


def _fsync_directory(path: Path) -> None:
    """Makes the entries of a directory (a rename into it) durable, where the OS can open a directory to sync it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces `final` in one rename.

    If the block raises (or the process dies), `final` is untouched and the partial directory is removed (or,
    after a hard kill, left with a `.tmp-` name that loaders ignore and `remove_interrupted_writes` deletes).
    Replacing an existing `final` takes two renames; a kill between them leaves the old one as `.{name}.old-PID`,
    which `remove_interrupted_writes` puts back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temporary_sibling(final)
    try:
        yield tmp
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_directory(tmp)
        old = final.with_name(f".{final.name}{OLD_INFIX}{os.getpid()}") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        # The renames are made durable before the previous version goes: a power loss could otherwise lose them
        # (though the files were synced), and with them both versions.
        _fsync_directory(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_interrupted_writes(parent: str | Path, name_pattern: str) -> list[Path]:
    """Deletes what `atomic_directory` left in `parent` when its process was killed mid-write (logged).

    A `.tmp-` directory is an unfinished write: deleted. A `.old-PID` directory is the previous version of a
    directory being replaced: deleted when the new version is in place, renamed back when the kill came between
    the two renames (the new version's `.tmp-` directory is then deleted like any other).
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
    tmp_name = re.compile(rf"\.(?:{name_pattern}){re.escape(TMP_INFIX)}{_MKDTEMP_SUFFIX}")
    old_name = re.compile(rf"\.(?P<final>{name_pattern}){re.escape(OLD_INFIX)}\d+")
    removed = []
    for child in sorted(parent.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        old = old_name.fullmatch(child.name)
        if old and not (parent / old["final"]).exists():
            logger.warning("restoring %s from %s: its replacement was stopped midway", old["final"], child)
            os.replace(child, parent / old["final"])
        elif old or tmp_name.fullmatch(child.name):
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
        meta.update(write_weights(tensors, tmp / WEIGHTS_NAME))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
        if write_more is not None:
            write_more(tmp)
    return Path(directory)


def shared_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first key} for every key whose tensor is the very tensor of an earlier key (tied weights).

    Works on `state_dict()` (entries are separate views of shared memory) and on `state_dict(keep_vars=True)`
    of a model on the meta device (tied parameters are one object there).
    """
    first: dict[object, str] = {}
    aliases = {}
    for key, tensor in tensors.items():
        kept = first.setdefault(_tensor_identity(tensor), key)
        if kept != key:
            aliases[key] = kept
    return aliases


def _tensor_identity(tensor: torch.Tensor) -> object:
    # Meta and empty tensors have no memory to compare (all share address 0), and tensor subclasses (quantized
    # weights) need not expose one: those count as shared only when they are the same object.
    if tensor.is_meta or tensor.numel() == 0 or type(tensor) not in (torch.Tensor, nn.Parameter):
        return ("object", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
            tuple(tensor.shape), tuple(tensor.stride()))


def write_weights(tensors: Mapping[str, torch.Tensor], file: Path) -> dict:
    """Writes tensors to a safetensors file, each shared tensor once (safetensors refuses shared memory).

    Returns:
        What the checkpoint description must record for `read_native_checkpoint` to restore the aliases:
        `{"tied": {alias: stored key}}`, or {} when nothing is shared.
    """
    aliases = shared_aliases(tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in aliases}, str(file),
              metadata={"format": "pt"})
    return {TIED_KEY: aliases} if aliases else {}


def tie_aliases(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Makes each alias parameter the very parameter of its key again (loading assigns them separately)."""
    for alias, kept in aliases.items():
        owner_path, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner_path) if owner_path else model, leaf, model.get_parameter(kept))


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
    """Reads the tensors of a `save_checkpoint` directory (composite key names); keys saved as aliases of a tied
    tensor map to the very tensor of the key it was stored under.

    Raises:
        CheckpointError: missing or corrupt files, or an unknown format version.
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME
    meta = read_native_meta(path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} is missing (the checkpoint was not completely written?)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({err})") from None
    for alias, kept in (meta.get(TIED_KEY) or {}).items():
        if kept not in tensors:
            raise CheckpointError(f"{weights}: key {kept!r} is missing, which {path / META_NAME} says the tied "
                                  f"{alias!r} shares")
        tensors[alias] = tensors[kept]  # one tensor under both names, as it was saved
    return tensors
