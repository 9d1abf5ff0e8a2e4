"""Regional `torch.compile`: each transformer block is compiled on its own, applied from outside the model.

Compiling blocks (not the whole model) keeps compile time to one block's worth, tolerates the data-dependent
placeholder merge between the towers and the LLM, and fuses each block's norms, RoPE and activations.
"""

from __future__ import annotations

from torch import nn

from minigpt4qwen.model.activation_checkpointing import decoder_layers
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


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
