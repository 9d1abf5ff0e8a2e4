"""Reader for the checkpoints the original MiniGPT4Qwen project wrote, returned in the composite model's names.

Layouts (tests/data/manifests/minigpt4qwen_checkpoints.json): a flat `model.pth` (projection only, or
the whole model from deepspeed2pth.py), `unfreeze_llm_model.pth` (projection + Qwen1 LLM), a LAVIS runner
`checkpoint_N.pth` (`{'model': trainable parameters + buffers, 'optimizer': ...}`), and a DeepSpeed pipeline
directory `global_stepN/` of `layer_XX-model_states.pt` files. The layout is detected from the content.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from minigpt4qwen.checkpoint.keymap import CheckpointError, KeyMap, rename
from minigpt4qwen.checkpoint.lavis import (
    as_state_dict,
    eva_vit_keymap,
    ln_vision_rules,
    load_torch_file,
    qformer_keymap,
)
from minigpt4qwen.checkpoint.qwen1 import qwen1_keymap
from minigpt4qwen.model.parts import PART_NAMES

logger = logging.getLogger(__name__)

_PIPELINE_FILE = re.compile(r"layer_(\d+)-model_states\.pt\Z")
_CONTAINERS = {
    "flat": "flat state dict (model.pth / unfreeze_llm_model.pth)",
    "runner": "LAVIS runner checkpoint ({'model': ..., 'optimizer': ...})",
    "pipeline": "DeepSpeed pipeline checkpoint directory (layer_XX-model_states.pt)",
}
# Non-block keys of the pipeline stages, renamed to the full model's names so one key map serves every layout.
_PIPELINE_RENAMES = {
    "wtepipe.word_embeddings.weight": "llm_model.transformer.wte.weight",
    "final_layernorm.weight": "llm_model.transformer.ln_f.weight",
    "lm_head.weight": "llm_model.lm_head.weight",
}
# The weight of the last stage's `IndentityPipeLayerLast`: a placeholder that only exists with a frozen LLM.
_PIPELINE_PLACEHOLDERS = {"occupy.weight"}
_BLOCK_PREFIX = "layer."


@dataclass(frozen=True)
class OriginalLayout:
    """What `read_original_checkpoint` found.

    Attributes:
        container: "flat", "runner" or "pipeline" (see the module docstring).
        parts: the composite parts present (names from `PART_NAMES`, in that order).
        num_tensors: how many tensors the reader returns.
    """

    container: str
    parts: tuple[str, ...]
    num_tensors: int

    @property
    def name(self) -> str:
        """A short id such as `runner:language_projection`."""
        return f"{self.container}:{'+'.join(self.parts)}"

    def describe(self) -> str:
        """One line for logs."""
        return f"{_CONTAINERS[self.container]} with {', '.join(self.parts)} ({self.num_tensors} tensors)"


def original_keymap() -> KeyMap:
    """Rules for every key of the full original model; partial checkpoints use a subset of them.

    Returns:
        A key map from `visual_encoder.*`, `ln_vision.*`, `Qformer.*`, `query_tokens`, `llm_proj.*` and
        `llm_model.*` (Qwen1 names) onto `vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`
        and `language_model.*` (`Qwen2ForCausalLM` names).
    """
    return KeyMap(
        "MiniGPT4Qwen (original)",
        [
            *eva_vit_keymap("visual_encoder.").rules,
            *ln_vision_rules(),
            *qformer_keymap().rules,
            *(rename(f"llm_proj.{p}", f"language_projection.{p}") for p in ("weight", "bias")),
            *qwen1_keymap("llm_model.", "language_model.").rules,
        ],
    )


def read_original_checkpoint(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads any checkpoint layout of the original project into composite names.

    Args:
        path: a `.pth` file, a DeepSpeed pipeline `global_stepN/` directory, or its parent with a `latest` file.

    Returns:
        Composite-named tensors (`vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`,
        `language_model.*`, whichever the checkpoint holds), in their stored dtypes. Load them with
        `load_checked(model, sd, source=path, allow_missing=True)`.

    Raises:
        CheckpointError: missing or unreadable files, or keys of no known layout (some are shown).
    """
    layout, state_dict = _read(Path(path))
    logger.info("%s: %s", path, layout.describe())
    return state_dict


def detect_original_layout(path: str | PathLike[str]) -> OriginalLayout:
    """Which layout `read_original_checkpoint` sees in `path` (it reads the checkpoint, memory-mapped).

    Args:
        path: as for `read_original_checkpoint`.

    Returns:
        The container kind, the composite parts present and the tensor count.

    Raises:
        CheckpointError: as `read_original_checkpoint`.
    """
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[OriginalLayout, dict[str, torch.Tensor]]:
    if path.is_dir():
        container, raw = "pipeline", _read_pipeline_dir(_pipeline_dir(path))
    else:
        obj = load_torch_file(path, "a MiniGPT4Qwen checkpoint (model.pth, checkpoint_N.pth, ...)")
        container = "runner" if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else "flat"
        raw = as_state_dict(obj, path, "model")
    converted = original_keymap().convert(raw, source=str(path))
    if not converted:
        raise CheckpointError(f"{path}: no weights, only buffers ({', '.join(list(raw)[:6])})")
    present = {key.split(".", 1)[0] for key in converted}
    parts = tuple(p for p in PART_NAMES if p in present)
    return OriginalLayout(container, parts, len(converted)), converted


def _pipeline_dir(path: Path) -> Path:
    # DeepSpeed writes `<save_dir>/latest` naming the newest `global_stepN` subdirectory.
    if not any(_PIPELINE_FILE.match(p.name) for p in path.iterdir()) and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir() or not any(_PIPELINE_FILE.match(p.name) for p in path.iterdir()):
        raise CheckpointError(
            f"{path}: not a DeepSpeed pipeline checkpoint (no layer_XX-model_states.pt files). For a non-pipeline "
            "DeepSpeed run, pass the model.pth that deepspeed2pth.py writes."
        )
    return path


def _read_pipeline_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Merges the per-stage files into the full model's flat names (what pipemodel2pth.py meant to write, plus
    the vision side of stage 0), numbering the Qwen blocks by their position among the block files."""
    files = sorted((int(m[1]), p) for p in directory.iterdir() if (m := _PIPELINE_FILE.match(p.name)))
    indices = [index for index, _ in files]
    if indices != list(range(len(files))):
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise CheckpointError(f"{directory}: incomplete pipeline checkpoint, missing layer file(s) {gaps[:6]}")
    known = original_keymap()
    merged: dict[str, torch.Tensor] = {}
    blocks: list[int] = []
    for index, file in files:
        stage = as_state_dict(load_torch_file(file, "one pipeline stage's weights"), file)
        is_block = any(key.startswith(_BLOCK_PREFIX) for key in stage)
        if is_block:
            blocks.append(index)
        for key, tensor in stage.items():
            if key in _PIPELINE_PLACEHOLDERS:
                continue
            if is_block and key.startswith(_BLOCK_PREFIX):
                name = f"llm_model.transformer.h.{len(blocks) - 1}.{key[len(_BLOCK_PREFIX):]}"
            else:
                name = _PIPELINE_RENAMES.get(key, key.removeprefix("visionpipe."))
            if known.match(name) is None:
                raise CheckpointError(f"{file}: key {key!r} is not part of a MiniGPT4Qwen pipeline stage")
            merged[name] = tensor
    # The blocks are the consecutive stages between the embedding/identity stages and the final norm.
    if blocks and blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise CheckpointError(f"{directory}: Qwen block files are not consecutive: layer indices {blocks}")
    logger.info("%s: %d stage files, %d Qwen blocks", directory, len(files), len(blocks))
    return merged
