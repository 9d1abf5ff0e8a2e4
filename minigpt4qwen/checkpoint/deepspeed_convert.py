"""DeepSpeed checkpoints (ours: ZeRO-0/1/2/3 and pipeline; the original project's) -> our native checkpoint.

    minigpt4qwen convert output/run/checkpoint-00001200 out/native [--parts language_projection]

ZeRO-1/2/3 weights come from the fp32 master copies through DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`;
ZeRO-0 weights from `mp_rank_00_model_states.pt`; our pipeline's `layer_XX-model_states.pt` files are renamed
with the `pipeline_keys.json` the pipeline trainer writes beside them; anything else goes to `original.py`.
A torn checkpoint (a rank's file missing, a file cut short by a killed save) is an error naming the file.
Every `*.pt` file is unpickled with `weights_only=True` (DeepSpeed's own readers too): tensors and the few plain
types DeepSpeed writes, never code; a file holding anything else is refused, naming the file and the type.
A LoRA run's adapters convert with the LoRA settings of the run's `config.yaml`, which loading them needs.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import FORMAT_VERSION, META_NAME, WEIGHTS_NAME, atomic_directory, write_weights
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


RUN_CONFIG = "config.yaml"  # the trainer's copy of the run's config, beside its checkpoints
_LORA_SETTINGS = ("r", "alpha", "dropout", "target_modules")  # what `native.lora_description` records
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class _Unread:
    """Stands in for values the conversion never reads: the numpy arrays of the trainer's RNG states. Torch does
    not trust numpy's array reconstruction on untrusted bytes, so none of numpy's code runs on them."""

    def __init__(self, *args: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> tuple:
    """The non-tensor types of DeepSpeed checkpoints that unpickling may build, beside torch's own safe ones.

    ZeroStageEnum (read by DeepSpeed's ZeRO reader), `fragment_address` (two ints) and the loss scalers (plain
    attributes) run no code of theirs when unpickled: instances are created empty and their attributes filled in.
    """
    allowed: list = [(_Unread, name) for name in ("numpy.core.multiarray._reconstruct", "numpy.ndarray",
                                                  "numpy._core.multiarray._reconstruct", "numpy.dtype")]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # the original's ZeRO module states are read without DeepSpeed (they hold none of these)
        return tuple(allowed)
    return (*allowed, ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler)


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside builds tensors and the allowed types only, DeepSpeed's readers' too: they pass
    weights_only=False themselves, which torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(list(_allowed_globals())):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _load(file: Path, *, mmap: bool = False) -> object:
    """`torch.load(weights_only=True)` to the CPU that names the file when it cannot or must not be read."""
    try:
        with torch.serialization.safe_globals(list(_allowed_globals())):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = found[1] if found else str(err).splitlines()[0]
        raise CheckpointError(f"{file}: refused: it holds {what}, which is neither a tensor nor a type DeepSpeed "
                              "writes into its checkpoints, and unpickling it could run code (a tampered or "
                              "foreign file?); convert only checkpoints you trust") from None
    except Exception as err:  # a truncated or damaged file raises many different types
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err}); was its save interrupted? "
                              "Convert an earlier checkpoint") from None


def check_complete(tag_dir: Path) -> None:
    """Checks that a DeepSpeed checkpoint directory is whole before DeepSpeed's readers (whose errors name no
    file) see it: every `*_states.pt` a complete torch archive holding only tensors and allowed types, and, for
    ZeRO, the per-rank files of every data-parallel rank that its model states record.

    Raises:
        CheckpointError: naming the truncated, missing or refused file.
    """
    files = sorted(tag_dir.glob("*_states.pt"))
    for file in files:
        # torch writes zip archives, whose directory is at the end: a file cut short has none.
        if not zipfile.is_zipfile(file):
            raise CheckpointError(f"{file}: truncated or not a torch checkpoint file (was its save interrupted?); "
                                  "convert an earlier checkpoint")
        _load(file, mmap=True)  # memory-mapped: only the pickled structure is read, and refused if unsafe
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

        with _weights_only_loads():
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
        for key, value in _load(file).items():
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
    """Writes tensors as a native checkpoint directory (the layout of `native.save_checkpoint`), atomically.

    Tensors shared by several keys (DeepSpeed restores tied weights as one tensor) are stored once, as there.
    `extra` must hold `lora` (see `run_lora_settings`) when the keys name LoRA adapters.
    """
    meta = {"format": "minigpt4qwen", "version": FORMAT_VERSION, "contents": "trainable", "keys": len(tensors),
            "lora": None, **(extra or {})}
    if meta["lora"] is None and (adapters := [k for k in tensors if "lora_" in k]):
        # Without the settings no loader can rebuild the adapters these keys belong to: refuse rather than write
        # a checkpoint that loads nowhere.
        raise CheckpointError(f"{directory}: key {adapters[0]!r} names a LoRA adapter, but no LoRA settings were "
                              "given to record")
    with atomic_directory(directory) as tmp:
        meta.update(write_weights(tensors, tmp / WEIGHTS_NAME))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def run_lora_settings(tag_dir: Path, example_key: str) -> dict:
    """The LoRA settings of the run that wrote a DeepSpeed checkpoint, from its `config.yaml` (`train.lora`), in
    the form a native LoRA save records (`native.lora_description`): loading rebuilds the adapters from them.

    Raises:
        CheckpointError: no config.yaml beside the checkpoint, or no enabled `train.lora` with every setting.
    """
    config_file = tag_dir.parent / RUN_CONFIG
    why = f"the checkpoint {tag_dir} holds LoRA adapters (e.g. {example_key!r}), whose settings loading needs"
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config_file} is missing: {why}; put the run's config.yaml (written by the trainer "
                              "beside its checkpoints) back there") from None
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{config_file}: unreadable ({err}); {why}") from None
    lora = ((config or {}).get("train") or {}).get("lora") if isinstance(config, dict) else None
    if not isinstance(lora, dict) or not lora.get("enabled"):
        raise CheckpointError(f"{config_file}: no train.lora with enabled: true, but {why}: is this the config of "
                              "the run that wrote it?")
    if missing := [f"train.lora.{name}" for name in _LORA_SETTINGS if lora.get(name) is None]:
        raise CheckpointError(f"{config_file}: key(s) {missing} missing; {why}")
    return {"r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
            "target_modules": sorted(lora["target_modules"])}


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
        CheckpointError: unreadable, torn or unsafe source, none of `parts` in it, or LoRA adapters without the
            run's LoRA settings (`run_lora_settings`).
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
    adapters = [k for k in tensors if "lora_" in k]
    lora = run_lora_settings(tag_dir, adapters[0]) if adapters else None
    return write_native(tensors, output, {"converted_from": str(source), "source_kind": origin, "lora": lora})
