"""A Hugging Face BLIP-2 directory (e.g. Salesforce/blip2-opt-2.7b) as a source of the vision side.

Only `vision_model.*`, `qformer.*` and `query_tokens` are read; the directory's own LLM and projection belong to a
different language model and are skipped without being loaded (shards are opened lazily with `safe_open`). The
Q-Former's text branch (`use_qformer_text_input`, e.g. blip2-itm) is skipped too: MiniGPT4Qwen feeds it no text.
Sizes are the directory's own (its config.json, checked against the tensors by `vision_sizes.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Blip2Config, PretrainedConfig

from minigpt4qwen.checkpoint.keymap import CheckpointError, KeyMap, KeyRule
from minigpt4qwen.checkpoint.lavis import as_state_dict, fuse_qkv_bias, load_torch_file, meta_like

_WANTED_PREFIXES = ("vision_model.", "qformer.")
_WANTED_KEYS = ("query_tokens",)
# The text branch's per-layer FFN (not `intermediate_query` / `output_query`, nor `attention.output`).
_TEXT_BRANCH = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
# safetensors header dtype names -> torch dtypes, to build meta tensors without reading any data.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
# Sizes that change tensor shapes or the computation; eps is not compared because the composite model sets the
# post_layernorm eps itself.
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "qkv_bias")
_QFORMER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "cross_attention_frequency", "encoder_hidden_size")
# transformers before the fused bias stored the two halves separately, like LAVIS.
_LEGACY_BIAS = KeyMap(
    "BLIP-2 separate q/v attention bias",
    [
        KeyRule(
            ("vision_model.encoder.layers.{i}.self_attn.q_bias", "vision_model.encoder.layers.{i}.self_attn.v_bias"),
            ("vision_model.encoder.layers.{i}.self_attn.qkv.bias",),
            fuse_qkv_bias,
        )
    ],
)


def read_hf_blip2_vision(
    directory: str | PathLike[str], target: Blip2Config | None = None, *, meta: bool = False
) -> tuple[dict[str, torch.Tensor], Blip2Config]:
    """Reads the vision tower, Q-Former and queries of a transformers BLIP-2 checkpoint directory.

    Args:
        directory: holds `config.json` (model_type "blip-2") and `model.safetensors`, sharded safetensors with
            `model.safetensors.index.json`, or `pytorch_model.bin` (optionally sharded with an index).
        target: the composite config the tensors are meant for, whose sizes must be the directory's; None
            checks nothing (the directory's own sizes).
        meta: return meta tensors (names, shapes and dtypes from the file headers; no data is read).

    Returns:
        (composite-named tensors in their stored dtype, the directory's own `Blip2Config`).

    Raises:
        CheckpointError: missing files, a model type other than BLIP-2, sizes that differ from `target`, or no
            vision/Q-Former tensors.
    """
    directory = Path(directory)
    config = _read_config(directory)
    if target is not None:
        _check_sizes(config, target, directory)
    state_dict = _read_wanted(directory, meta)
    if not state_dict:
        raise CheckpointError(f"{directory}: no vision_model.* / qformer.* / query_tokens tensors in the weights")
    legacy = {key: state_dict.pop(key) for key in list(state_dict) if _LEGACY_BIAS.match(key)}
    state_dict.update(_LEGACY_BIAS.convert(legacy, source=str(directory)))
    return state_dict, config


def _read_config(directory: Path) -> Blip2Config:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json; expected a transformers BLIP-2 model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    if model_type != "blip-2":
        raise CheckpointError(f"{config_file}: model_type is {model_type!r}, expected 'blip-2'")
    return Blip2Config.from_json_file(str(config_file))


def _check_sizes(config: Blip2Config, target: Blip2Config, directory: Path) -> None:
    vision, qformer, queries = target.vision_config, target.qformer_config, target.num_query_tokens
    diffs = [*_diff("vision_config", config.vision_config, vision, _VISION_FIELDS),
             *_diff("qformer_config", config.qformer_config, qformer, _QFORMER_FIELDS)]
    if config.num_query_tokens != queries:
        diffs.append(f"num_query_tokens: {config.num_query_tokens} != {queries}")
    if diffs:
        raise CheckpointError(f"{directory}: BLIP-2 sizes differ from the target model (found != expected): "
                              + "; ".join(diffs))


def _diff(section: str, found: PretrainedConfig, expected: PretrainedConfig, fields: Iterable[str]) -> list[str]:
    return [f"{section}.{f}: {getattr(found, f)} != {getattr(expected, f)}" for f in fields
            if getattr(found, f) != getattr(expected, f)]


def _wanted(key: str) -> bool:
    return (key.startswith(_WANTED_PREFIXES) or key in _WANTED_KEYS) and not _TEXT_BRANCH.match(key)


def _read_wanted(directory: Path, meta: bool) -> dict[str, torch.Tensor]:
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index_name).is_file():
            shards = _shards_from_index(directory / index_name)
        elif (directory / single_name).is_file():
            shards = {single_name: None}
        else:
            continue
        reader = _read_safetensors if single_name.endswith(".safetensors") else _read_torch_bin
        out: dict[str, torch.Tensor] = {}
        for shard, keys in shards.items():
            out.update(reader(directory / shard, keys, meta))
        return out
    raise CheckpointError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def _shards_from_index(index_file: Path) -> dict[str, list[str] | None]:
    """Shard file -> the wanted keys it holds; shards with none are never opened."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index_file}: not a weight index ({type(err).__name__}: {err})") from err
    shards: dict[str, list[str] | None] = {}
    for key, shard in weight_map.items():
        if _wanted(key):
            shards.setdefault(shard, []).append(key)
    return shards


def _read_safetensors(file: Path, keys: list[str] | None, meta: bool) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: shard not found")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names = keys if keys is not None else [k for k in handle.keys() if _wanted(k)]
            if meta:
                slices = {name: handle.get_slice(name) for name in names}
                return {name: _meta_tensor(t.get_shape(), t.get_dtype()) for name, t in slices.items()}
            return {name: handle.get_tensor(name) for name in names}
    except Exception as err:  # safetensors raises SafetensorError / OSError for bad headers and truncated data
        raise CheckpointError(f"{file}: cannot read the safetensors file ({type(err).__name__}: {err})") from err


def _meta_tensor(shape: list[int], dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")


def _read_torch_bin(file: Path, keys: list[str] | None, meta: bool) -> dict[str, torch.Tensor]:
    state_dict = as_state_dict(load_torch_file(file, "BLIP-2 weights (pytorch_model.bin)"), file)
    names = keys if keys is not None else [k for k in state_dict if _wanted(k)]
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise CheckpointError(f"{file}: the index lists keys the shard lacks, e.g. {missing[:6]}")
    wanted = {name: state_dict[name] for name in names}
    return meta_like(wanted) if meta else wanted
