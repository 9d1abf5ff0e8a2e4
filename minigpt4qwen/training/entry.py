"""`minigpt4qwen train CONFIG [key=value ...]`: config -> model, data, trainer, in one process or under torchrun.

The model is built on each process's device (on the CPU for the pipeline engine, which moves each stage's
layers to its device), LoRA and activation checkpointing are applied, the memory estimate is checked (not for
the pipeline and DeepSpeed: it estimates a whole model on one device), and DDP, DeepSpeed ZeRO or the DeepSpeed
pipeline is applied from outside the model before the trainer's loop takes over.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from transformers import set_seed

from minigpt4qwen.config import load_config, to_yaml
from minigpt4qwen.training import distributed
from minigpt4qwen.training.config import RunConfig
from minigpt4qwen.training.memory import check_training_memory
from minigpt4qwen.training.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)


def train_main(config_path: str | None, overrides: list[str] | None = None) -> TrainResult:
    """Runs (or resumes) the training described by a YAML file plus overrides.

    Args:
        config_path: the run's YAML (model, data and train sections).
        overrides: dotted `key=value` strings, e.g. ["train.max_steps=100"].

    Returns:
        The trainer's `TrainResult` (on every rank).

    Raises:
        ValueError: an invalid config.
        MemoryError: the pre-flight estimate says the run cannot fit on the device.
        NonFiniteError: too many non-finite steps.
    """
    from minigpt4qwen.checkpoint.assemble import apply_runtime_options, build_model
    from minigpt4qwen.data.collate import DataCollator
    from minigpt4qwen.data.dataset import ConversationDataset

    cfg: RunConfig = load_config(config_path, overrides, RunConfig)
    cfg.validate()
    info = distributed.init_distributed()
    cfg.parallel.validate(info.world_size)
    try:
        if cfg.model.float8:  # before any weight loads
            from minigpt4qwen.model.float8 import check_float8_support

            check_float8_support(info.device)
        if cfg.model.attn_implementation == "flex_attention" and info.device.type != "cuda":
            raise ValueError("model.attn_implementation=flex_attention trains on CUDA GPUs only (torch's "
                             f"FlexAttention has no backward on the {info.device.type}): set "
                             "model.attn_implementation=sdpa")
        # Same config, same train.seed: the same run. The fresh projection and LoRA adapters draw from the global
        # RNGs, seeded alike on every rank so every replica starts from the same weights.
        set_seed(cfg.train.seed)
        pipeline = cfg.parallel.engine == "pipeline"
        # The pipeline engine moves only its own stage's layers to the device: the whole model would not fit.
        # Float8-stored weights reach the device already float8 (a 14B model's 28 GB of bf16 weights would not fit
        # the 24 GB card its float8 weights fit): stored as the shards stream in, or, where LoRA adapters must wrap
        # the bf16 Linears first, from a bf16 model built on the host, one layer at a time after the adapters.
        float8_while_loading = cfg.model.float8_weights and not cfg.train.lora.enabled
        on_host = pipeline or (cfg.model.float8_weights and not float8_while_loading)
        model, tokenizer = build_model(cfg.model, device=torch.device("cpu") if on_host else info.device,
                                       runtime=False, float8_weights=float8_while_loading)
        if model.config.vision_config.image_size != cfg.data.image_size:  # a size read from the vision weights
            raise ValueError(f"the vision tower takes {model.config.vision_config.image_size} px images but "
                             f"data.image_size is {cfg.data.image_size}: set both to the tower's size")
        if cfg.train.lora.enabled:
            from minigpt4qwen.training.lora import apply_lora

            logger.info("LoRA: %d trainable adapter parameters", apply_lora(model, cfg.train.lora))
        if cfg.model.float8 and not float8_while_loading:  # after LoRA (its adapters stay in high precision)
            from minigpt4qwen.model.float8 import apply_float8

            logger.info("float8: %d LLM Linear layers", apply_float8(model, device=info.device))
            if cfg.model.float8_weights:
                from minigpt4qwen.model.float8_weights import store_float8_weights

                logger.info("float8 weights: %d frozen LLM weights stored in float8",
                            store_float8_weights(model.language_model, info.device))
                model.to(info.device)  # the rest of the model
        apply_runtime_options(model, cfg.model)  # after LoRA, so wrappers and compilation see the adapters
        check_training_memory(model, cfg, info.device)  # not for the pipeline and DeepSpeed: see there
        dataset = ConversationDataset(cfg.data, tokenizer, image_token_id=model.image_token_id,
                                      num_query_tokens=model.num_query_tokens, train=True, seed=cfg.train.seed)
        pad = cfg.data.pad_to_multiple_of
        if pipeline:  # few sequence lengths: few activation shapes between stages
            pad = math.lcm(pad, cfg.parallel.seq_bucket)
        if cfg.data.packing:  # padding-free rows (data/packing.py)
            from minigpt4qwen.data.packing import PackingCollator, default_pack_length

            pack_length = cfg.data.pack_length
            if pack_length is None:
                pack_length = default_pack_length(cfg.model.attn_implementation, cfg.data.max_txt_len)
            collate = PackingCollator(tokenizer.pad_token_id, pack_length, pad_to_multiple_of=pad)
        else:
            collate = DataCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad)
        val_dataset = None
        if cfg.data.val_datasets:
            val_dataset = ConversationDataset(dataclasses.replace(cfg.data, datasets=cfg.data.val_datasets), tokenizer,
                                              image_token_id=model.image_token_id,
                                              num_query_tokens=model.num_query_tokens, train=False, seed=cfg.train.seed)
        # Training draws (dropout) get one stream per process, as one process would draw different masks for
        # each part of the global batch; data order and augmentation are seeded per sample (data/dataset.py).
        set_seed(cfg.train.seed + info.rank)
        common = dict(info=info, num_workers=cfg.data.num_workers, config_yaml=to_yaml(cfg), val_dataset=val_dataset,
                      lengths=dataset.lengths if cfg.data.group_by_length else None,
                      packed_lengths=dataset.lengths if cfg.data.packing else None)
        if cfg.parallel.engine == "deepspeed":
            from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer

            trainer = DeepSpeedTrainer(model, cfg.train, dataset, collate, parallel=cfg.parallel, **common)
        elif pipeline:
            from minigpt4qwen.training.pipeline import PipelineTrainer

            trainer = PipelineTrainer(model, cfg.train, dataset, collate, parallel=cfg.parallel, **common)
        else:
            trainer = Trainer(distributed.wrap_ddp(model, info), cfg.train, dataset, collate, **common)
        trainer.resume()
        result = trainer.fit()
        if info.is_main:
            tokenizer.save_pretrained(f"{cfg.train.output_dir}/tokenizer")
        return result
    finally:
        # DDP's reducer holds the process group: freed after the group is destroyed, its destructor can wait (with
        # the GIL) for a gloo thread that waits for the GIL, and the process never exits. Drop our references first;
        # `destroy` collects what they held.
        trainer = model = None
        distributed.destroy()
