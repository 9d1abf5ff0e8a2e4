"""A pre-flight memory estimate: will the model, its optimizer state and one micro-batch fit on the device?

Rough by design (activations are estimated from the LLM's shape alone); it exists to turn an hour-later
out-of-memory crash into a clear message before the first step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from minigpt4qwen.model.quantization import stored_bytes
from minigpt4qwen.training.config import RunConfig

logger = logging.getLogger(__name__)

GiB = 1024**3
# Bytes stored per token per LLM layer in the backward pass, in units of hidden_size x activation bytes (attention
# inputs/outputs, MLP intermediates of ~3x width, norms): a common rule of thumb for decoder blocks.
_ACTIVATION_FACTOR = 16


@dataclass
class MemoryEstimate:
    """Bytes needed, by kind, and the device's available bytes."""

    weights: int
    gradients_and_optimizer: int
    activations: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.gradients_and_optimizer + self.activations

    def describe(self) -> str:
        have = f"{self.available / GiB:.1f} GiB available" if self.available is not None else "available unknown"
        return (f"estimated {self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, gradients + AdamW "
                f"{self.gradients_and_optimizer / GiB:.1f}, activations {self.activations / GiB:.1f}); {have}")


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or MemAvailable of the host for the CPU (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(model: nn.Module, *, micro_batch_size: int, max_length: int, activation_bytes: int,
                    checkpointed_llm: bool, device: torch.device, checkpoint_every: int = 1) -> MemoryEstimate:
    """Estimates the training memory of one process.

    Args:
        model: the model as it will train (dtypes and trainable flags set).
        micro_batch_size: samples per forward pass.
        max_length: the longest sample in tokens (data.max_txt_len).
        activation_bytes: 2 under bf16/fp16 autocast, 4 in fp32.
        checkpointed_llm: LLM activation checkpointing on (checkpointed blocks keep only their inputs).
        device: where the model will train.
        checkpoint_every: only every k-th LLM block is checkpointed (model.activation_checkpointing.every).

    Returns:
        A `MemoryEstimate`.
    """
    # Quantized weights count their packed size; float8-stored weights (model.float8_weights) are buffers.
    sizes = [(stored_bytes(p), p.device) for p in model.parameters()] + [(b.nbytes, b.device) for b in model.buffers()]
    weights = sum(size for size, _ in sizes)
    # What the model already holds on `device` is counted in the estimate, and not free any more: add it back.
    resident = sum(size for size, where in sizes if where.type == device.type)
    available = available_memory(device)
    # Per trainable parameter: its gradient and AdamW's two moments, all three in the parameter's own dtype (torch
    # keeps the moments like the parameter: a bf16 weight has bf16 moments).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = sum(p.numel() * 3 * p.element_size() for p in trainable)
    text = getattr(getattr(model, "config", None), "text_config", None)
    hidden = getattr(text, "hidden_size", 0)
    layers = getattr(text, "num_hidden_layers", 0)
    per_layer = micro_batch_size * max_length * hidden * activation_bytes
    if checkpointed_llm:
        # Blocks 0, k, 2k, ... are checkpointed: they keep their inputs, the others everything, and the backward
        # pass recomputes one checkpointed block's activations at a time.
        checkpointed = -(-layers // max(checkpoint_every, 1))
        uncheckpointed = layers - checkpointed
        activations = per_layer * (checkpointed + (uncheckpointed + (checkpointed > 0)) * _ACTIVATION_FACTOR)
    else:
        activations = per_layer * layers * _ACTIVATION_FACTOR
    return MemoryEstimate(weights, optimizer, activations, None if available is None else available + resident)


def check_training_memory(model: nn.Module, cfg: RunConfig, device: torch.device) -> MemoryEstimate | None:
    """The pre-flight check of a run (train.check_memory): logs the estimate and refuses a run that cannot fit.

    The estimate is of one whole model on one device: it is skipped (with a logged note) under the pipeline engine,
    where each process holds one stage, and under DeepSpeed, whose ZeRO stages partition the optimizer state,
    gradients and (stage 3) weights over the processes and may offload them to the host.

    Returns:
        The estimate, or None where it was skipped.

    Raises:
        MemoryError: the estimate exceeds the device's available memory (see `check_fits`).
    """
    if not cfg.train.check_memory:
        return None
    if cfg.parallel.engine != "ddp":
        logger.info("memory: no pre-flight estimate under parallel.engine=%s (it partitions the model over the "
                    "processes); an out-of-memory error shows at the first step", cfg.parallel.engine)
        return None
    checkpointing = cfg.model.activation_checkpointing
    estimate = estimate_memory(model, micro_batch_size=cfg.train.micro_batch_size, max_length=cfg.data.max_txt_len,
                               activation_bytes=4 if cfg.train.precision == "fp32" else 2,
                               checkpointed_llm=checkpointing.language_model, device=device,
                               checkpoint_every=checkpointing.every)
    logger.info("memory: %s", estimate.describe())
    check_fits(estimate)
    return estimate


def check_fits(estimate: MemoryEstimate) -> None:
    """Raises MemoryError with advice when the estimate exceeds the available memory."""
    if estimate.available is not None and estimate.total > estimate.available:
        raise MemoryError(
            f"this run will not fit: {estimate.describe()}. Reduce train.micro_batch_size (and raise "
            "train.grad_accum), lower data.max_txt_len, store frozen parts in bf16 (model.dtypes.*), turn on "
            "model.activation_checkpointing.language_model, or freeze the LLM / use train.lora.enabled=true."
        )
