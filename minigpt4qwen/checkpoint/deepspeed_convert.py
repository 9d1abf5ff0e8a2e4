"""DeepSpeed checkpoints (ours: ZeRO-0/1/2/3 and pipeline; the original project's) -> our native checkpoint.

    minigpt4qwen convert output/run/checkpoint-00001200 out/native [--parts language_projection]

ZeRO-1/2/3 weights come from the fp32 master copies through DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`;
ZeRO-0 weights from `mp_rank_00_model_states.pt`; our pipeline's `layer_XX-model_states.pt` files are renamed
with the `pipeline_keys.json` the pipeline trainer writes beside them; anything else goes to `original.py`.
A torn checkpoint (a rank's file missing, a file cut short by a killed save) is an error naming the file.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import FORMAT_VERSION, META_NAME, WEIGHTS_NAME, atomic_directory
from minigpt4qwen.checkpoint.original import original_keymap, read_original_checkpoint
from minigpt4qwen.model.minigpt4qwen import part_of_key
from minigpt4qwen.model.parts import PART_NAMES

PIPELINE_KEYS = "pipeline_keys.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
# Activation-checkpoint wrappers appear in parameter names (DeepSpeed records named_parameters), not in state_dict.
_WRAPPER = "_checkpoint_wrapped_module."
# Per-rank files of ZeRO checkpoints: [bf16_]zero_pp_rank_R_mp_rank_00_{optim,model}_states.pt.
_RANK_FILE = re.compile(
    r"(?P<prefix>(?:bf16_)?zero_pp_rank_)(?P<rank>\d+)(?P<rest>_mp_rank_\d+_(?P<kind>optim|model)_states\.pt)"
)


def _load(file: Path, *, weights_only: bool = False, mmap: bool = False) -> object:
    """`torch.load` to the CPU that names the file when it cannot be read."""
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # a truncated or damaged file raises many different types
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err}); was its save interrupted? "
                              "Convert an earlier checkpoint") from None


def check_complete(tag_dir: Path) -> None:
    """Checks that a DeepSpeed checkpoint directory is whole before DeepSpeed's readers (whose errors name no
    file) see it: every `*_states.pt` a complete torch archive, and, for ZeRO, the per-rank files of every
    data-parallel rank that its model states record.

    Raises:
        CheckpointError: naming the truncated or missing file.
    """
    files = sorted(tag_dir.glob("*_states.pt"))
    for file in files:
        # torch writes zip archives, whose directory is at the end: a file cut short has none.
        if not zipfile.is_zipfile(file):
            raise CheckpointError(f"{file}: truncated or not a torch checkpoint file (was its save interrupted?); "
                                  "convert an earlier checkpoint")
    ranked = [(m, file) for file in files if (m := _RANK_FILE.fullmatch(file.name))]
    model_states = [f for f in files if f.name == MODEL_STATES] + [f for m, f in ranked if m["kind"] == "model"]
    if not ranked or not model_states:
        return  # not ZeRO-partitioned (ZeRO-0, pipeline), or no model states at all (reported by the readers)
    world = _load(model_states[0], mmap=True).get("dp_world_size")
    for kind in ("optim", "model"):
        present = {int(m["rank"]): m for m, _ in ranked if m["kind"] == kind}
        if not present:
            continue  # ZeRO-1/2 keep one model states file, not one per rank
        example = next(iter(present.values()))
        for rank in range(world or 0):
            if rank not in present:
                name = f"{example['prefix']}{rank}{example['rest']}"
                raise CheckpointError(f"{tag_dir / name} is missing: the checkpoint was written by {world} ranks "
                                      f"and has the {kind} states of only {len(present)}; convert an earlier one")


def _tag_dir(path: Path) -> Path:
    """A DeepSpeed save_dir with a `latest` file -> the checkpoint directory it names."""
    if (path / "latest").is_file() and not any(path.glob("*model_states.pt")):
        return path / (path / "latest").read_text().strip()
    return path


def read_deepspeed_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads one of our DeepSpeed checkpoints (ZeRO or pipeline) into composite names, fp32 masters when stored.

    Args:
        path: `output_dir/checkpoint-N`, or `output_dir` (its `latest` is followed).

    Returns:
        The saved (trainable) parameters by composite name (`language_projection.weight`, ...).

    Raises:
        CheckpointError: not a DeepSpeed checkpoint written by our engines.
    """
    tag_dir = _tag_dir(Path(path))
    if (tag_dir / PIPELINE_KEYS).is_file():
        return _read_pipeline(tag_dir)
    if not any(tag_dir.glob(f"*{MODEL_STATES}")):
        raise CheckpointError(f"{tag_dir}: no {MODEL_STATES} or {PIPELINE_KEYS}: not one of our DeepSpeed checkpoints")
    check_complete(tag_dir)
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO-1/2/3 (and bf16 ZeRO-0): partitioned fp32 masters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tensors = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                           exclude_frozen_parameters=True)
    else:
        tensors = _load(tag_dir / MODEL_STATES)["module"]
    return {key.replace(_WRAPPER, ""): value for key, value in tensors.items()}


def _read_pipeline(tag_dir: Path) -> dict[str, torch.Tensor]:
    names = json.loads((tag_dir / PIPELINE_KEYS).read_text())  # {layer index: {key in layer: composite key}}
    tensors = {}
    for index, mapping in names.items():
        file = tag_dir / f"layer_{int(index):02d}-model_states.pt"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (an incomplete pipeline checkpoint)")
        for key, value in _load(file, weights_only=True).items():
            if key not in mapping:
                raise CheckpointError(f"{file}: key {key!r} is not in {PIPELINE_KEYS}")
            tensors[mapping[key]] = value
    return tensors


def _original_zero_module(tag_dir: Path) -> dict[str, torch.Tensor] | None:
    """The module state dict of the original project's ZeRO-0/1/2 checkpoint (LAVIS/Qwen1 names), else None.

    The original saved without `exclude_frozen_parameters`, so `mp_rank_00_model_states.pt` holds the complete
    model in its training dtype; its own `deepspeed2pth.py` read exactly that, and so does this (the fp32 masters
    in the optimizer files are not needed). Memory-mapped: our own checkpoints are only peeked at.
    """
    if not (tag_dir / MODEL_STATES).is_file():  # ZeRO-3 names its files per rank: ours, the original had none
        return None
    check_complete(tag_dir)
    states = _load(tag_dir / MODEL_STATES, mmap=True)
    module = states.get("module") or {}
    if not module or all(k.split(".", 1)[0] in PART_NAMES for k in module):
        return None
    return module


def write_native(tensors: dict[str, torch.Tensor], directory: str | Path, extra: dict | None = None) -> Path:
    """Writes tensors as a native checkpoint directory (the layout of `native.save_checkpoint`), atomically."""
    meta = {"format": "minigpt4qwen", "version": FORMAT_VERSION, "contents": "trainable", "keys": len(tensors),
            **(extra or {})}
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def convert_to_native(source: str | Path, output: str | Path, parts: Sequence[str] | None = None) -> Path:
    """Converts any DeepSpeed-era checkpoint to a native checkpoint that chat and training load.

    Args:
        source: one of our DeepSpeed checkpoints (see `read_deepspeed_checkpoint`), or any checkpoint of the
            original project (`model.pth`, a pipeline `global_stepN/` directory, ...).
        output: the native checkpoint directory to write.
        parts: keep only these model parts (e.g. ["language_projection"] for a projection-only checkpoint);
            all saved parts when None.

    Returns:
        The output directory.

    Raises:
        CheckpointError: unreadable source, or none of `parts` in it.
    """
    source = Path(source)
    tag_dir = _tag_dir(source) if source.is_dir() else source
    ours_pipeline = (tag_dir / PIPELINE_KEYS).is_file()
    # The original's pipeline directories also hold model states, but no key map: original.py reads them.
    zero_dir = any(tag_dir.glob(f"*{MODEL_STATES}")) and not any(tag_dir.glob("layer_*-model_states.pt"))
    original_module = _original_zero_module(tag_dir) if zero_dir and not ours_pipeline else None
    if original_module is not None:
        tensors, origin = original_keymap().convert(original_module, source=str(source)), "original-deepspeed"
    elif ours_pipeline or zero_dir:
        tensors, origin = read_deepspeed_checkpoint(tag_dir), "deepspeed"
    else:
        tensors, origin = read_original_checkpoint(source), "original"
    if parts is not None:
        tensors = {k: v for k, v in tensors.items() if part_of_key(k) in parts}
        if not tensors:
            raise CheckpointError(f"{source}: holds none of the parts {list(parts)}")
    return write_native(tensors, output, {"converted_from": str(source), "source_kind": origin})
