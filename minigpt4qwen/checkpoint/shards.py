"""The weight files of a Hugging Face style model directory: found by its index (or a single file), read one shard
at a time onto the CPU, and checked against the index, each failure naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from minigpt4qwen.checkpoint.keymap import CheckpointError

# (single file, index) pairs in order of preference.
_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def checkpoint_shards(directory: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """Finds the weight files of a Hugging Face style directory (safetensors preferred over .bin).

    Args:
        directory: the model directory.

    Returns:
        The shard paths and the index's key -> shard-file map (None for a single unsharded file).

    Raises:
        FileNotFoundError: no weights at all, or a shard named by the index is absent.
        CheckpointError: the index is not valid JSON or has no `weight_map`.
    """
    directory = Path(directory)
    for single, index_name in _LAYOUTS:
        index_file = directory / index_name
        if index_file.is_file():
            try:
                weight_map = dict(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid shard index ({e!r})") from e
            names = sorted(set(weight_map.values()))
            if absent := [n for n in names if not (directory / n).is_file()]:
                raise FileNotFoundError(f"{len(absent)} shard(s) named by {index_file} are missing: {absent[:4]}")
            return [directory / n for n in names], weight_map
        if (directory / single).is_file():
            return [directory / single], None
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
    )


def load_weights_only(path: str | Path) -> object:
    """`torch.load` of a `.bin`/`.pth` file to the CPU without running pickled code, memory-mapped when its format
    allows (a pre-1.6, non-zip file cannot be mapped: it is read whole). Errors are torch's own."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """Reads one safetensors or `.bin` weight file onto the CPU (`.bin`: memory-mapped, weights-only unpickler).

    Args:
        file: the shard.

    Returns:
        Its tensors by name.

    Raises:
        CheckpointError: the file is truncated, corrupt or not a flat dict of tensors.
    """
    try:
        if file.suffix == ".safetensors":
            tensors = safetensors.torch.load_file(file)
        else:
            tensors = load_weights_only(file)
    except (safetensors.SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read weight shard (truncated or corrupt?): {e}") from e
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors, found {type(tensors).__name__}")
    return tensors


def check_against_index(file: Path, keys: set[str], weight_map: Mapping[str, str]) -> None:
    """Raises unless `file` holds exactly the keys the index `weight_map` puts in it (both ways named)."""
    listed = {k for k, shard in weight_map.items() if shard == file.name}
    stray = {k: weight_map.get(k, "not in the index") for k in sorted(keys - listed)[:6]}
    absent = sorted(listed - keys)[:6]
    if stray or absent:
        raise CheckpointError(f"{file}: does not match the index: keys it puts elsewhere {stray}, missing {absent}")
