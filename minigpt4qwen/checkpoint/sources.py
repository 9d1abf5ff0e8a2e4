"""Reads any supported weight source into composite (Blip2ForConditionalGeneration) names.

One entry point per slot of the model config, each dispatching on what the path holds, so users pass the files
they have: LAVIS `.pth` files, a Hugging Face BLIP-2 directory, the original project's checkpoints, ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Blip2Config

from minigpt4qwen.checkpoint.hf_blip2 import read_hf_blip2_vision
from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.lavis import read_blip2_pretrained, read_eva_vit_g
from minigpt4qwen.checkpoint.native import is_native_checkpoint, read_native_checkpoint
from minigpt4qwen.checkpoint.original import read_original_checkpoint


def _require(path: str | Path, slot: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{slot}: {path} does not exist")
    return path


def is_hf_blip2_dir(path: str | Path) -> bool:
    """A directory whose config.json says model_type blip-2 (a transformers BLIP-2 or our export)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "blip-2"
    except json.JSONDecodeError:
        return False


@dataclass
class WeightSource:
    """One configured weight source, read into composite (Blip2ForConditionalGeneration) names.

    setting: the config field it came from (`model.vision_weights`, `model.qformer_weights`, `model.checkpoint`).
    hf_config: a Hugging Face BLIP-2 directory's own config.json (its sizes, heads included); None for files.
    """

    setting: str
    path: Path
    tensors: dict[str, torch.Tensor]
    hf_config: Blip2Config | None = None


def read_vision_weights(path: str | Path, *, meta: bool = False) -> WeightSource:
    """`vision_model.*` from eva_vit_g.pth (or a LAVIS BLIP-2 file with its ViT) or a HF BLIP-2 directory.

    Args:
        path: the file or directory.
        meta: meta tensors only (shapes and dtypes; nothing is read beyond the headers).
    """
    path = _require(path, "model.vision_weights")
    if path.is_dir():
        tensors, config = read_hf_blip2_vision(path, meta=meta)
        return WeightSource("model.vision_weights", path,
                            {k: v for k, v in tensors.items() if k.startswith("vision_model.")}, config)
    return WeightSource("model.vision_weights", path, read_eva_vit_g(path, meta=meta))


def read_qformer_weights(path: str | Path, *, meta: bool = False) -> WeightSource:
    """`qformer.*`, `query_tokens`, `vision_model.post_layernorm.*` from blip2_pretrained*.pth or a HF BLIP-2 dir.

    Args:
        path: the file or directory.
        meta: meta tensors only (shapes and dtypes; nothing is read beyond the headers).
    """
    path = _require(path, "model.qformer_weights")
    if path.is_dir():
        tensors, config = read_hf_blip2_vision(path, meta=meta)
        kept = {k: v for k, v in tensors.items()
                if not k.startswith("vision_model.") or k.startswith("vision_model.post_layernorm.")}
        return WeightSource("model.qformer_weights", path, kept, config)
    return WeightSource("model.qformer_weights", path, read_blip2_pretrained(path, meta=meta))


def read_model_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A trained checkpoint: ours (directory with minigpt4qwen.json) or any of the original project's layouts."""
    path = _require(path, "model.checkpoint")
    if is_native_checkpoint(path):
        return read_native_checkpoint(path)
    if is_hf_blip2_dir(path):
        raise CheckpointError(f"{path} is a whole exported model: load it with load_exported(), not as a checkpoint")
    return read_original_checkpoint(path)
