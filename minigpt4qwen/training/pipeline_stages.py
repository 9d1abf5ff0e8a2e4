"""The pipeline engine's layers: the model's own modules cut into a sequence DeepSpeed can place on stages.

[vision tower + Q-Former + projection + token embedding + placeholder merge] -> one layer per decoder block ->
[final norm + LM head + masked loss]. Between stages travel (hidden [B, T, H], attention mask [B, T], positions
[B, T]); each block rebuilds its causal mask and rotary embeddings from them, as the LLM's own decoder does.
Packed rows (`data.packing`) send an all-ones mask that the blocks ignore, so transformers finds the samples in
the positions as it does for the other engines.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from minigpt4qwen.model.activation_checkpointing import decoder_layers
from minigpt4qwen.model.loss import image_path_anchor, masked_lm_loss_sum
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


class EmbedLayer(nn.Module):
    """Stage 0: images -> projected query features written onto the placeholders of the token embeddings."""

    def __init__(self, model: MiniGPT4Qwen):
        super().__init__()
        self.vision_model, self.qformer = model.vision_model, model.qformer
        self.query_tokens, self.language_projection = model.query_tokens, model.language_projection
        self.embed_tokens = model.language_model.get_input_embeddings()
        self._model = (model,)  # in a tuple: the model's methods are called, its other parts not registered here

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, attention_mask, pixel_values, position_ids = inputs
        model = self._model[0]
        features = model.encode_images(pixel_values) if pixel_values.shape[0] else None
        # Text only: this stage's output must still lead back to the trained image path, or its backward has
        # nothing to differentiate (see image_path_anchor).
        anchor = image_path_anchor(model, input_ids.device) if features is None else None
        hidden = model.embed(input_ids, features)
        if anchor is not None:
            hidden = hidden + anchor.to(hidden.dtype)
        return hidden, attention_mask, position_ids


def _mask_function(config, index: int):
    # Qwen2-style configs name each layer's attention kind; Mistral-style ones have one sliding window for all.
    kinds = getattr(config, "layer_types", None)
    sliding = kinds[index] == "sliding_attention" if kinds else getattr(config, "sliding_window", None) is not None
    return create_sliding_window_causal_mask if sliding else create_causal_mask


class BlockLayer(nn.Module):
    """One decoder block, called as the LLM's decoder calls it (causal mask, rotary embeddings, positions)."""

    def __init__(self, block: nn.Module, index: int, language_model: nn.Module):
        super().__init__()
        # A checkpoint-wrapped block is unwrapped and checkpointed here instead: the wrapper's prefix shows in
        # parameter names but not in state-dict keys, and DeepSpeed's pipeline checkpoint needs them to agree.
        inner = getattr(block, "_checkpoint_wrapped_module", None)
        self.block, self.checkpointed = (block, False) if inner is None else (inner, True)
        self._mask_function = _mask_function(language_model.config, index)
        # A registered submodule, so DeepSpeed moves it to the stage's device; shared by all blocks, and its
        # buffers are not persistent, so it adds nothing to the checkpoint.
        self.rotary = language_model.get_decoder().rotary_emb
        self.config = language_model.config
        # Set per step by the trainer: packed rows, whose mask comes from the positions (no attention mask).
        self.packed = False

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, attention_mask, position_ids = inputs
        rotary, config = self.rotary, self.config
        mask = self._mask_function(config=config, inputs_embeds=hidden, cache=None, position_ids=position_ids,
                                   attention_mask=None if self.packed else attention_mask)
        kwargs = {"attention_mask": mask, "position_ids": position_ids,
                  "position_embeddings": rotary(hidden, position_ids)}
        if self.checkpointed and torch.is_grad_enabled():
            hidden = checkpoint(self.block, hidden, use_reentrant=False, **kwargs)
        else:
            hidden = self.block(hidden, **kwargs)
        return hidden, attention_mask, position_ids


def stage_inputs(batch: dict) -> tuple[torch.Tensor, ...]:
    """The first stage's inputs of a collated batch: (input ids, attention mask, images, positions [B, T]); a
    packed batch has its positions and no mask (all ones is sent), a padded one a mask and positions 0..T-1."""
    input_ids = batch["input_ids"]
    if "position_ids" in batch:
        attention_mask, position_ids = torch.ones_like(input_ids), batch["position_ids"]
    else:
        attention_mask = batch["attention_mask"]
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
    return input_ids, attention_mask, batch.get("pixel_values", torch.zeros(0, 3, 1, 1)), position_ids


class HeadLayer(nn.Module):
    """Last stage: the final norm; `loss` applies the LM head to the supervised positions only."""

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.norm = language_model.get_decoder().norm
        self.lm_head = language_model.get_output_embeddings()
        # Set per step: DeepSpeed averages micro-batch losses and ranks, this turns them into the token-weighted mean.
        self.scale = 1.0

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.norm(inputs[0])

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_lm_loss_sum(hidden, labels, self.lm_head)[0] * self.scale


def pipeline_layers(model: MiniGPT4Qwen) -> list[nn.Module]:
    """The model as a flat list of pipeline layers sharing its modules (no copies, no placeholder layers).

    Raises:
        ValueError: a tied LM head (its weight would live in two stages).
    """
    lm = model.language_model
    if getattr(lm.config, "tie_word_embeddings", False):
        raise ValueError("the pipeline engine needs an untied LM head (tie_word_embeddings=False)")
    return [EmbedLayer(model), *(BlockLayer(b, i, lm) for i, b in enumerate(decoder_layers(lm))), HeadLayer(lm)]
