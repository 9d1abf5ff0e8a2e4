"""Activation (gradient) checkpointing applied from outside the model, per transformer block.

transformers' own switch only acts in train mode, but a frozen tower is kept in eval mode; wrapping the blocks
with torch's non-reentrant checkpoint works in either mode and still lets gradients flow through frozen weights
to the projection. State-dict keys are unchanged (the wrapper strips its own prefix).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers causal LM (works through a peft wrapper)."""
    decoder = language_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(decoder).__name__} has no `layers` ModuleList; cannot find its decoder blocks")
    return layers


def _wrap_all(layers: nn.ModuleList, every: int) -> int:
    wrapped = 0
    for idx, layer in enumerate(layers):
        if idx % every == 0 and not getattr(layer, "_minigpt4qwen_checkpointed", False):
            layers[idx] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            layers[idx]._minigpt4qwen_checkpointed = True
            wrapped += 1
    return wrapped


def apply_activation_checkpointing(model: MiniGPT4Qwen, *, vision: bool, language_model: bool, every: int = 1) -> int:
    """Recomputes each block's activations in the backward pass instead of storing them.

    Args:
        model: the model, modified in place.
        vision: checkpoint the ViT blocks.
        language_model: checkpoint the LLM decoder blocks.
        every: checkpoint every `every`-th block only (2 = half of them): a memory/compute trade-off between
            storing all activations and recomputing all of them.

    Returns:
        The number of blocks wrapped.
    """
    wrapped = 0
    if vision:
        wrapped += _wrap_all(model.vision_model.encoder.layers, every)
    if language_model:
        wrapped += _wrap_all(decoder_layers(model.language_model), every)
    return wrapped
