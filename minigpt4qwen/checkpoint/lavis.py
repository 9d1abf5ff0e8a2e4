"""Readers for the LAVIS files MiniGPT4Qwen starts from: `eva_vit_g.pth` and `blip2_pretrained_flant5xxl.pth`.

Both are returned in the composite model's names (`vision_model.*`, `qformer.*`, `query_tokens`) by the key
maps below (the real files' keys: tests/data/manifests/eva_vit_g.json, lavis_source_checkpoints.json). The key
maps take prefixes, so the same rules also read the original project's full checkpoints, where the ViT sits
under `visual_encoder.`. Any size works: the model is built to the files' shapes (`vision_sizes.py`), so other
LAVIS BLIP-2 / InstructBLIP checkpoints load too, including fine-tuned ones that carry their ViT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from minigpt4qwen.checkpoint.keymap import CheckpointError, KeyMap, KeyRule, drop, rename
from minigpt4qwen.checkpoint.shards import load_weights_only

logger = logging.getLogger(__name__)

# Where the original project expected the files; quoted in "file not found" messages.
EVA_VIT_G_HINT = "cache/ckpt/eva/eva_vit_g.pth"
BLIP2_HINT = "cache/ckpt/blip2/blip2_pretrained_flant5xxl.pth"

# EVA block modules with a weight and a bias (the qkv bias is fused separately).
_EVA_BLOCK_MODULES = (
    ("norm1", "layer_norm1"),
    ("attn.proj", "self_attn.projection"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)
# LAVIS Q-Former sub-module -> transformers sub-module, per layer; only the `self` -> `attention` step differs.
_QFORMER_LAYER_MODULES = (
    ("attention.self.query", "attention.attention.query"),
    ("attention.self.key", "attention.attention.key"),
    ("attention.self.value", "attention.attention.value"),
    ("attention.output.dense", "attention.output.dense"),
    ("attention.output.LayerNorm", "attention.output.LayerNorm"),
    ("crossattention.self.query", "crossattention.attention.query"),
    ("crossattention.self.key", "crossattention.attention.key"),
    ("crossattention.self.value", "crossattention.attention.value"),
    ("crossattention.output.dense", "crossattention.output.dense"),
    ("crossattention.output.LayerNorm", "crossattention.output.LayerNorm"),
    ("intermediate_query.dense", "intermediate_query.dense"),
    ("output_query.dense", "output_query.dense"),
    ("output_query.LayerNorm", "output_query.LayerNorm"),
)
_WB = ("weight", "bias")
# A LAVIS BLIP-2 checkpoint whose ViT was trained (e.g. the 364 px fine-tuned ones) keeps it under this prefix.
_VISUAL_ENCODER = "visual_encoder."
# LAVIS's CLIP ViT-L (`clip_L`) keys: a LayerNorm before the blocks and QuickGELU, which Blip2VisionModel lacks.
_CLIP_VIT_KEYS = ("conv1.weight", "ln_pre.weight", "positional_embedding")


def fuse_qkv_bias(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Fuses EVA's separate biases into the one bias of transformers' `Blip2Attention`.

    EVA has no key bias; a zero one is equivalent, since a constant added to every key shifts all of a query's
    logits equally and softmax cancels it.

    Args:
        tensors: `(q_bias, v_bias)`, each [W].

    Returns:
        `(cat(q_bias, zeros, v_bias),)`, one [3W] tensor.
    """
    q_bias, v_bias = tensors
    return (torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),)


def eva_vit_keymap(source_prefix: str = "", target_prefix: str = "vision_model.") -> KeyMap:
    """Rules for the LAVIS EVA ViT (`eva_vit.VisionTransformer`) onto `Blip2VisionModel`, without `ln_vision`.

    Args:
        source_prefix: `""` for `eva_vit_g.pth`, `"visual_encoder."` inside MiniGPT4Qwen checkpoints.
        target_prefix: where the `Blip2VisionModel` sits in the target module.

    Returns:
        The key map.
    """
    s, t = source_prefix, target_prefix
    block, layer = f"{s}blocks.{{i}}.", f"{t}encoder.layers.{{i}}."
    rules = [
        rename(f"{s}cls_token", f"{t}embeddings.class_embedding"),
        rename(f"{s}pos_embed", f"{t}embeddings.position_embedding"),
        *(rename(f"{s}patch_embed.proj.{p}", f"{t}embeddings.patch_embedding.{p}") for p in _WB),
        *(rename(f"{block}{src}.{p}", f"{layer}{dst}.{p}") for src, dst in _EVA_BLOCK_MODULES for p in _WB),
        rename(f"{block}attn.qkv.weight", f"{layer}self_attn.qkv.weight"),
        KeyRule((f"{block}attn.q_bias", f"{block}attn.v_bias"), (f"{layer}self_attn.qkv.bias",), fuse_qkv_bias),
    ]
    return KeyMap("EVA ViT-g (LAVIS)", rules)


def ln_vision_rules(source_prefix: str = "", target_prefix: str = "vision_model.") -> list[KeyRule]:
    """`ln_vision.*` -> `post_layernorm.*` (the model must set that norm's eps to 1e-5 itself).

    Args:
        source_prefix: prepended to `ln_vision.`.
        target_prefix: where the `Blip2VisionModel` sits in the target module.

    Returns:
        Two rename rules (weight, bias).
    """
    return [rename(f"{source_prefix}ln_vision.{p}", f"{target_prefix}post_layernorm.{p}") for p in _WB]


def qformer_keymap(source_prefix: str = "", target_prefix: str = "") -> KeyMap:
    """Rules for the LAVIS Q-Former (`Qformer.bert.*`, `query_tokens`) onto `qformer.*` / `query_tokens`.

    The text branch (word/position embeddings, per-layer `intermediate`/`output` FFN, `Qformer.cls`) is
    recognised and dropped: MiniGPT4Qwen never uses it, but stage-1 BLIP-2 files carry it.

    Args:
        source_prefix: prepended to the LAVIS keys (`Qformer.bert.*`, `Qformer.cls.*`, `query_tokens`).
        target_prefix: prepended to the composite keys.

    Returns:
        The key map.
    """
    bert, t = f"{source_prefix}Qformer.bert.", target_prefix
    src_layer, dst_layer = f"{bert}encoder.layer.{{i}}.", f"{t}qformer.encoder.layer.{{i}}."
    cls = f"{source_prefix}Qformer.cls.predictions."
    rules = [
        rename(f"{source_prefix}query_tokens", f"{t}query_tokens"),
        *(rename(f"{bert}embeddings.LayerNorm.{p}", f"{t}qformer.layernorm.{p}") for p in _WB),
        *(rename(f"{src_layer}{src}.{p}", f"{dst_layer}{dst}.{p}") for src, dst in _QFORMER_LAYER_MODULES for p in _WB),
        drop(f"{bert}embeddings.position_ids"),
        drop(f"{bert}embeddings.word_embeddings.weight", f"{bert}embeddings.position_embeddings.weight"),
        drop(*(f"{src_layer}{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm") for p in _WB)),
        drop(f"{cls}bias", f"{cls}decoder.weight", f"{cls}decoder.bias",
             *(f"{cls}transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in _WB)),
    ]
    return KeyMap("BLIP-2 Q-Former (LAVIS)", rules)


def blip2_pretrained_keymap() -> KeyMap:
    """Everything a LAVIS `blip2_pretrained*.pth` `['model']` may hold: Q-Former, queries, `ln_vision`, heads.

    The heads of the other BLIP-2 variants (stage-1 contrastive/matching heads, the OPT and T5 projections,
    InstructBLIP's `llm_proj`) are dropped: they feed a different LLM or objective.

    Returns:
        The key map (composite targets `qformer.*`, `query_tokens`, `vision_model.post_layernorm.*`).
    """
    heads = ("t5_proj", "opt_proj", "llm_proj", "vision_proj", "text_proj", "itm_head")
    return KeyMap(
        "BLIP-2 pretrained (LAVIS)",
        [*qformer_keymap().rules, *ln_vision_rules(), drop("temp", *(f"{h}.{p}" for h in heads for p in _WB))],
    )


def load_torch_file(path: str | PathLike[str], what: str, original_location: str | None = None) -> Any:
    """`torch.load` on CPU without running pickled code, memory-mapped when the format allows.

    Args:
        path: the file.
        what: what the file should contain, for messages (e.g. "the EVA ViT-g weights").
        original_location: where the original project kept it, quoted when the file is missing.

    Returns:
        The unpickled object (tensors are mmap-backed for zip-format files).

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one holding non-tensor pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (the original project kept it at {original_location})" if original_location else ""
        raise CheckpointError(f"{path}: file not found; expected {what}{where}")
    try:
        return load_weights_only(path)
    except Exception as err:  # torch.load raises OSError, RuntimeError, UnpicklingError, EOFError... for bad bytes
        raise CheckpointError(
            f"{path}: cannot read {what}: the file is truncated, corrupt or not a PyTorch checkpoint, or it holds "
            f"pickled objects other than tensors and plain containers (refused, as unpickling them can run code). "
            f"torch.load said: {_torch_error_detail(err)}"
        ) from err


def _torch_error_detail(err: Exception) -> str:
    # The weights-only unpickler buries the real cause after a long generic preamble.
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return f"{type(err).__name__}: " + " ".join(text.split(marker, 1)[1].split("\n\n")[:2]).strip()
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def as_state_dict(obj: Any, path: str | PathLike[str], nesting_key: str | None = None) -> dict[str, torch.Tensor]:
    """Validates that `obj` (or `obj[nesting_key]` when present) is a flat `{name: tensor}` dict.

    Args:
        obj: what `load_torch_file` returned.
        path: the file, for messages.
        nesting_key: a wrapper key to look through, e.g. `"model"` for LAVIS files.

    Returns:
        The state dict.

    Raises:
        CheckpointError: not a dict, or entries that are not tensors (the wrong kind of file).
    """
    if nesting_key is not None and isinstance(obj, Mapping) and isinstance(obj.get(nesting_key), Mapping):
        obj = obj[nesting_key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found a {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors; entries {', '.join(bad[:6])}")
    return dict(obj)


def _require_part(out: dict[str, torch.Tensor], prefix: str, path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    # Callers load with allow_missing (the parts come from several files), so an empty result would load nothing
    # without a word; a file holding only ignorable keys is the wrong file.
    if not any(k.startswith(prefix) for k in out):
        raise CheckpointError(f"{path}: holds no {prefix}* weights (only ignorable keys); wrong file for this slot?")
    return out


def meta_like(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape-and-dtype-only copies on the meta device (nothing of a memory-mapped file is read)."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}


def read_eva_vit_g(path: str | PathLike[str], *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Reads `eva_vit_g.pth` (flat, no prefix, fp16 on disk) into `vision_model.*` names.

    A LAVIS BLIP-2 checkpoint (`{'model': ...}`) holding its own fine-tuned ViT under `visual_encoder.` works
    too: only those keys are taken (the rest is the Q-Former's, read through `read_blip2_pretrained`).

    Args:
        path: the file.
        meta: return meta tensors (names, shapes and dtypes only), e.g. to read the sizes.

    Returns:
        `vision_model.embeddings.*` and `vision_model.encoder.*` tensors in their stored dtype (no
        `post_layernorm`: that is `ln_vision`, which comes with the BLIP-2 file).

    Raises:
        CheckpointError: missing/unreadable file, keys that are not EVA ViT keys (e.g. a BLIP-2 file without a
            ViT), or a CLIP ViT (LAVIS `clip_L`), which transformers' BLIP-2 vision model cannot express.
    """
    raw = as_state_dict(load_torch_file(path, "the EVA ViT-g weights (eva_vit_g.pth)", EVA_VIT_G_HINT), path, "model")
    prefix = _VISUAL_ENCODER if any(k.startswith(_VISUAL_ENCODER) for k in raw) else ""
    if prefix:
        raw = {k: v for k, v in raw.items() if k.startswith(prefix)}
    if any(f"{prefix}{k}" in raw for k in _CLIP_VIT_KEYS):
        raise CheckpointError(
            f"{path}: a CLIP ViT (LAVIS clip_L: conv1, ln_pre, transformer.resblocks), not an EVA ViT. Its LayerNorm "
            "before the blocks has no counterpart in transformers' Blip2VisionModel, so it cannot be loaded; use "
            "an EVA ViT (eva_vit_g.pth) or a Hugging Face BLIP-2 directory"
        )
    converted = eva_vit_keymap(source_prefix=prefix).convert(meta_like(raw) if meta else raw, source=str(path))
    return _require_part(converted, "vision_model.", path)


def read_blip2_pretrained(path: str | PathLike[str], *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Reads a LAVIS `blip2_pretrained*.pth` or InstructBLIP checkpoint (`{'model': {...}}`) into composite names.

    Args:
        path: the file (MiniGPT4Qwen uses `blip2_pretrained_flant5xxl.pth`).
        meta: return meta tensors (names, shapes and dtypes only), e.g. to read the sizes.

    Returns:
        `qformer.*`, `query_tokens` and `vision_model.post_layernorm.*` (from `ln_vision`), of the file's sizes.
        A fine-tuned ViT the file may hold (`visual_encoder.*`) is skipped here: name the same file as
        `model.vision_weights` to load it.

    Raises:
        CheckpointError: missing/unreadable file, or keys outside the BLIP-2 format (e.g. an EVA file).
    """
    raw = as_state_dict(load_torch_file(path, "the BLIP-2 Q-Former weights", BLIP2_HINT), path, "model")
    vit = [k for k in raw if k.startswith(_VISUAL_ENCODER)]
    if vit:
        logger.info("%s: %d ViT tensors (visual_encoder.*) left to model.vision_weights", path, len(vit))
        raw = {k: v for k, v in raw.items() if not k.startswith(_VISUAL_ENCODER)}
    converted = blip2_pretrained_keymap().convert(meta_like(raw) if meta else raw, source=str(path))
    return _require_part(converted, "qformer.", path)
