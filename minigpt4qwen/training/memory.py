"""A pre-flight memory estimate: will the model, its optimizer state and one micro-batch fit on the device?

Rough by design (activations are estimated from the LLM's shape alone); it exists to turn an hour-later
out-of-memory crash into a clear message before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minigpt4qwen.model.quantization import stored_bytes

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
                    checkpointed_llm: bool, device: torch.device) -> MemoryEstimate:
    """Estimates the training memory of one process.

    Args:
        model: the model as it will train (dtypes and trainable flags set).
        micro_batch_size: samples per forward pass.
        max_length: the longest sample in tokens (data.max_txt_len).
        activation_bytes: 2 under bf16/fp16 autocast, 4 in fp32.
        checkpointed_llm: LLM activation checkpointing on (only block inputs are kept).
        device: where the model will train.

    Returns:
        A `MemoryEstimate`.
    """
    # Quantized weights count their packed size; float8-stored weights (model.float8_weights) are buffers.
    sizes = [(stored_bytes(p), p.device) for p in model.parameters()] + [(b.nbytes, b.device) for b in model.buffers()]
    weights = sum(size for size, _ in sizes)
    # What the model already holds on `device` is counted in the estimate, and not free any more: add it back.
    resident = sum(size for size, where in sizes if where.type == device.type)
    available = available_memory(device)
    # fp32 master state per trainable parameter: its gradient (in its own dtype) + AdamW's two moments (fp32).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = sum(p.numel() * (p.element_size() + 8) for p in trainable)
    text = getattr(getattr(model, "config", None), "text_config", None)
    hidden = getattr(text, "hidden_size", 0)
    layers = getattr(text, "num_hidden_layers", 0)
    per_layer = micro_batch_size * max_length * hidden * activation_bytes
    activations = per_layer * (layers + _ACTIVATION_FACTOR if checkpointed_llm else layers * _ACTIVATION_FACTOR)
    return MemoryEstimate(weights, optimizer, activations, None if available is None else available + resident)


def check_fits(estimate: MemoryEstimate) -> None:
    """Raises MemoryError with advice when the estimate exceeds the available memory."""
    if estimate.available is not None and estimate.total > estimate.available:
        raise MemoryError(
            f"this run will not fit: {estimate.describe()}. Reduce train.micro_batch_size (and raise "
            "train.grad_accum), lower data.max_txt_len, store frozen parts in bf16 (model.dtypes.*), turn on "
            "model.activation_checkpointing.language_model, or freeze the LLM / use train.lora.enabled=true."
        )
