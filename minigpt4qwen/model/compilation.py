"""`torch.compile` applied from outside the model: regional (each transformer block on its own, for training)
and of a decoder's step (inference).

Compiling blocks (not the whole model) keeps compile time to one block's worth, tolerates the data-dependent
placeholder merge between the towers and the LLM, and fuses each block's norms, RoPE and activations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minigpt4qwen.model.activation_checkpointing import decoder_layers
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.quantization import is_quantized

# What torchao recommends for weight-only quantized layers: under coordinate-descent tuning inductor turns a
# one-row matmul over int8 weights into a tuned reduction that reads each weight once (without it, it casts the
# whole weight to bf16 first, as eager mode does). The tuning makes compiles much slower, and the rewrite applies
# to matmuls of one row known when compiling, so it is used for the batch-1 decoder's compiles only (static
# shapes), not the scheduler's (its batch size is symbolic).
QUANTIZED_DECODE_INDUCTOR = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}


def compile_blocks(model: MiniGPT4Qwen, *, vision: bool = True, language_model: bool = True,
                   mode: str | None = None, dynamic: bool | None = None) -> int:
    """Compiles the ViT and/or LLM blocks in place (`nn.Module.compile`); returns how many were compiled.

    Args:
        model: the model (activation-checkpoint wrappers, if any, are compiled with their block).
        vision: compile the ViT blocks.
        language_model: compile the LLM decoder blocks.
        mode: `torch.compile` mode (None = default; "max-autotune-no-cudagraphs" tunes GEMMs longer).
        dynamic: `torch.compile`'s dynamic-shape setting (None lets torch decide after a recompile).
    """
    blocks: list[nn.Module] = []
    if vision:
        blocks += list(model.vision_model.encoder.layers)
    if language_model:
        blocks += list(decoder_layers(model.language_model))
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic)
    return len(blocks)


def compile_decode_step(step: Callable[..., Any], model: nn.Module, *, mode: str,
                        dynamic: bool) -> Callable[..., Any]:
    """`torch.compile(step, fullgraph=True)` for a decoder of `model`; with quantized weights and static shapes,
    every compile of it (the first call's and any recompile) runs under `QUANTIZED_DECODE_INDUCTOR`.

    Args:
        step: the decode step's forward.
        model: the model it runs (checked for torchao's quantized weights).
        mode: the inductor mode ("default", "max-autotune", ...).
        dynamic: `torch.compile`'s dynamic-shape setting.
    """
    compiled = torch.compile(step, mode=mode, fullgraph=True, dynamic=dynamic)
    if dynamic or not any(is_quantized(p) for p in model.parameters()):
        return compiled
    import torch._inductor.config as inductor_config

    @functools.wraps(step)
    def tuned(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(QUANTIZED_DECODE_INDUCTOR):
            return compiled(*args, **kwargs)

    return tuned
