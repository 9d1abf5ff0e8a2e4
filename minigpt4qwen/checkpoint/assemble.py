"""Assembles a ready model from a `ModelConfig`: LLM directory + vision weights + Q-Former weights + checkpoint.

The vision tower and Q-Former take the sizes of their files (or the config's; `vision_sizes.py`), are built on
the meta device and materialised straight from the files, so no part is ever held twice; every tensor is checked
by name and shape, and a part left without weights is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.keymap import CheckpointError, load_checked
from minigpt4qwen.checkpoint.llm import load_llm, prepare_placeholder
from minigpt4qwen.checkpoint.native import is_native_checkpoint, read_native_meta
from minigpt4qwen.checkpoint.sources import (
    WeightSource,
    read_model_checkpoint,
    read_qformer_weights,
    read_vision_weights,
)
from minigpt4qwen.checkpoint.vision_sizes import model_architecture
from minigpt4qwen.config import ModelConfig
from minigpt4qwen.model.activation_checkpointing import apply_activation_checkpointing
from minigpt4qwen.model.compilation import compile_blocks
from minigpt4qwen.model.configs import minigpt4qwen_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen, part_of_key
from minigpt4qwen.presets import resolve_preset

logger = logging.getLogger(__name__)

# Parts a fresh run may start without (initialised randomly): the projection is what MiniGPT4Qwen trains.
FRESHLY_INITIALISED = ("language_projection",)


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", runtime: bool = True,
                fresh_projection: bool = True, float8_weights: bool = False
                ) -> tuple[MiniGPT4Qwen, PreTrainedTokenizerBase]:
    """Loads every configured source and returns the model with trainable flags and dtypes applied.

    Args:
        cfg: the model section of a config (paths, flags, dtypes); a preset fills empty paths.
        device: where the model ends up.
        runtime: also apply activation checkpointing and compilation (`apply_runtime_options`); pass False to
            modify the modules first (e.g. LoRA) and apply them afterwards.
        fresh_projection: a projection no source provides is initialised randomly (a new training run); False
            (inference) makes it an error instead of a model that answers from an untrained projection.
        float8_weights: store the LLM blocks' Linear weights in float8 on `device` (`model/float8_weights.py`),
            frozen, shard by shard as they stream in (training's `model.float8_weights` where no LoRA is added
            afterwards: peft wraps bf16 Linears only).

    Returns:
        (model, tokenizer).

    Raises:
        FileNotFoundError / CheckpointError: a missing, unreadable or mismatching source (file and key named),
            or sources whose sizes disagree with each other or with the config.
    """
    cfg = resolve_preset(cfg)
    if cfg.llm is None:
        raise ValueError("model.llm is not set: give an LLM directory or a preset (model.preset=qwen7b_chat)")
    dtypes = cfg.dtypes.as_dict()
    # The checkpoint is read first: it may hold any part, and its shapes count when the sizes are settled.
    checkpoint = (WeightSource("model.checkpoint", Path(cfg.checkpoint), read_model_checkpoint(cfg.checkpoint))
                  if cfg.checkpoint else None)
    lora = _checkpoint_lora(cfg.checkpoint)
    # A quantized (or float8-stored) LLM streams onto the device, shrunk shard by shard, unless the checkpoint still
    # changes its weights (a trained LLM, LoRA adapters to merge): then it shrinks once they are in (see below).
    if cfg.quantize and float8_weights:
        raise ValueError("model.quantize and model.float8_weights both shrink the LLM's weights: choose one")
    if float8_weights and cfg.trainable.language_model:
        raise ValueError("model.float8_weights stores frozen LLM weights: set model.trainable.language_model=false")
    stream = bool(cfg.quantize or float8_weights) and lora is None and not (
        checkpoint and any(k.startswith("language_model.") for k in checkpoint.tensors))
    language_model, tokenizer = load_llm(
        cfg.llm, dtype=dtypes["language_model"], device=device if stream else "cpu",
        attn_implementation=cfg.attn_implementation, quantize=cfg.quantize if stream else None,
        float8_weights=float8_weights and stream,
    )
    architecture = model_architecture(cfg, checkpoint)
    image_token_id = prepare_placeholder(language_model, tokenizer, cfg.placeholder_token)
    config = minigpt4qwen_config(
        language_model.config,
        image_token_id=image_token_id,
        vision_config=architecture.vision,
        qformer_config=architecture.qformer,
        num_query_tokens=architecture.num_query_tokens,
    )
    with init_empty_weights(include_buffers=False):
        model = MiniGPT4Qwen(config, language_model=language_model)
    model.cast_parts(cfg.dtypes)  # meta tensors take the target dtypes, so loads cast while they materialise

    if lora is not None:  # the checkpoint's keys name LoRA adapters: rebuild them before loading
        from minigpt4qwen.training.config import LoraConfig
        from minigpt4qwen.training.lora import apply_lora

        apply_lora(model, LoraConfig(**lora))
    sources = []
    if cfg.vision_weights:
        sources.append(read_vision_weights(cfg.vision_weights))
    if cfg.qformer_weights:
        sources.append(read_qformer_weights(cfg.qformer_weights))
    if checkpoint is not None:
        sources.append(checkpoint)
    for source in sources:
        tensors = source.tensors
        load_checked(model, tensors, source=str(source.path), allow_missing=True)
        logger.info("%s: loaded %d tensors into %s", source.path, len(tensors),
                    sorted({part_of_key(k) for k in tensors}))
    _initialise_or_fail(model, FRESHLY_INITIALISED if fresh_projection else ())
    if lora is not None:  # fold the adapters into the LLM weights: a plain model, exportable, no adapter overhead
        model.language_model = model.language_model.merge_and_unload()
        logger.info("%s: LoRA adapters merged into the LLM", cfg.checkpoint)

    model.set_trainable(cfg.trainable)
    if cfg.quantize:  # what streaming left (the output head), or everything, one layer at a time onto the device
        from minigpt4qwen.model.quantization import quantize_language_model

        quantize_language_model(model, cfg.quantize, device=device)
    if float8_weights:  # everything if it did not stream, one layer at a time onto the device
        from minigpt4qwen.model.float8_weights import Float8WeightLinear, store_loaded_weights_in_float8

        store_loaded_weights_in_float8(model.language_model, device)
        logger.info("float8 weights: %d frozen LLM Linear layers stored in float8",
                    sum(isinstance(m, Float8WeightLinear) for m in model.language_model.modules()))
    model = model.to(device)
    if runtime:
        apply_runtime_options(model, cfg)
    return model, tokenizer


def apply_runtime_options(model: MiniGPT4Qwen, cfg: ModelConfig) -> None:
    """Activation checkpointing, then regional compilation, as the config asks (wrappers applied from outside)."""
    checkpointing = cfg.activation_checkpointing
    apply_activation_checkpointing(model, vision=checkpointing.vision_model,
                                   language_model=checkpointing.language_model, every=checkpointing.every)
    if cfg.compile_blocks:
        compile_blocks(model)


def _checkpoint_lora(checkpoint: str | None) -> dict | None:
    """The LoRA settings recorded in one of our checkpoints, if it holds adapters."""
    if checkpoint is None or not is_native_checkpoint(checkpoint):
        return None
    return read_native_meta(checkpoint).get("lora")


def _initialise_or_fail(model: MiniGPT4Qwen, fresh_parts: tuple[str, ...]) -> None:
    """Gives parts a fresh run may lack a random init; any other part still on meta is a configuration error."""
    missing: dict[str, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            missing.setdefault(part_of_key(key), []).append(key)
    for part in fresh_parts:
        # Only a part with none of its tensors given starts fresh: re-initialising one given in part would
        # overwrite what was loaded (a checkpoint without the bias, say), so that is an error like the others.
        loaded = [k for k, t in getattr(model, part).state_dict(keep_vars=True).items() if not t.is_meta]
        if part in missing and not loaded:
            module: nn.Linear = getattr(model, part)
            module.to_empty(device="cpu")
            module.reset_parameters()
            logger.info("%s: no weights given, initialised randomly (a fresh training run)", part)
            missing.pop(part)
    if missing:
        hints = {"language_projection": "model.checkpoint / -c (a trained model.pth or checkpoint directory)",
                 "vision_model": "model.vision_weights (eva_vit_g.pth)",
                 "qformer": "model.qformer_weights (blip2_pretrained_flant5xxl.pth)",
                 "query_tokens": "model.qformer_weights (blip2_pretrained_flant5xxl.pth)"}
        lines = [f"{part} ({len(keys)} tensors, e.g. {keys[0]}): set {hints.get(part, 'model.checkpoint')}"
                 for part, keys in missing.items()]
        raise CheckpointError("no weights were given for: " + "; ".join(lines))
