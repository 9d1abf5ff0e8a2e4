"""MiniGPT4Qwen: EVA ViT-g (+ ln_vision) -> Q-Former with learned queries -> Linear -> causal LLM.

Composed from transformers classes with the attribute names of `Blip2ForConditionalGeneration`, so the state
dict *is* that class's state dict and exports without renaming. No I/O, tokenization or parallelism here:
loaders live in `minigpt4qwen.checkpoint`, prompts in `minigpt4qwen.text`, engines in `minigpt4qwen.training`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Blip2Config, Blip2QFormerModel, Blip2VisionModel

from minigpt4qwen.model.configs import LN_VISION_EPS
from minigpt4qwen.model.device_copy import to_device_queued
from minigpt4qwen.model.image_tokens import merge_image_features
from minigpt4qwen.model.loss import LOSS_CHUNK_ROWS, image_path_anchor, masked_lm_loss_sum
from minigpt4qwen.model.parts import PART_NAMES, PartDtypes, TrainableParts


@dataclass
class MiniGPT4QwenOutput:
    """What `forward` returns.

    loss: mean cross-entropy over the supervised tokens of this batch (None without labels).
    loss_sum / num_tokens: its numerator and denominator, for exact averaging across accumulation and ranks.
    logits: [B, T, V], only when no labels were given (training never materialises them).
    """

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: int = 0
    logits: torch.Tensor | None = None


class MiniGPT4Qwen(nn.Module):
    """The multimodal chat model.

    Args:
        config: a `Blip2Config` (see `minigpt4qwen.model.configs.minigpt4qwen_config`).
        language_model: an already built causal LM (e.g. loaded from a directory); built from
            `config.text_config` when None.
    """

    def __init__(self, config: Blip2Config, language_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        # post_layernorm plays the original's ln_vision, whose eps differs from the block norms' (see configs.py).
        self.vision_model.post_layernorm.eps = getattr(config, "ln_vision_eps", LN_VISION_EPS)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        if not self.query_tokens.is_meta:
            nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.frozen_parts: set[str] = set()
        # Rows per LM-head call in the training loss; None makes it one call per forward, as engines that turn
        # each call into a collective need (set from outside, see `masked_lm_loss_sum`).
        self.loss_chunk_rows: int | None = LOSS_CHUNK_ROWS

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens

    # ----------------------------------------------------------------------------------------- settings
    def set_trainable(self, parts: TrainableParts) -> None:
        """Sets `requires_grad` per part; frozen parts are switched to (and kept in) eval mode."""
        self.frozen_parts = set()
        for name, trainable in parts.as_dict().items():
            part = getattr(self, name)
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for p in params:
                p.requires_grad_(trainable)
            if not trainable:
                self.frozen_parts.add(name)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MiniGPT4Qwen":
        """Like `nn.Module.train`, but frozen parts stay in eval mode (no dropout in a frozen Q-Former)."""
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name)
            if isinstance(part, nn.Module):
                part.eval()
        return self

    def cast_parts(self, dtypes: PartDtypes) -> None:
        """Stores each part in its own dtype (e.g. bf16 frozen towers, fp32 trained projection)."""
        for name, dtype in dtypes.as_dict().items():
            part = getattr(self, name)
            if isinstance(part, nn.Parameter):
                part.data = part.data.to(dtype)
            else:
                part.to(dtype)

    def part_dtype(self, name: str) -> torch.dtype:
        """Storage dtype of a part (of its first floating-point parameter)."""
        part = getattr(self, name)
        if isinstance(part, nn.Parameter):
            return part.dtype
        return next(p.dtype for p in part.parameters() if p.is_floating_point())

    # ------------------------------------------------------------------------------------------- compute
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised images -> [N, Q, H] projected query outputs, one row block per image."""
        image_embeds = self.vision_model(
            pixel_values=pixel_values.to(self.part_dtype("vision_model"))
        ).last_hidden_state  # [N, 1 + P, W], already through ln_vision (post_layernorm)
        qformer_dtype = self.part_dtype("qformer")
        queries = self.query_tokens.to(qformer_dtype).expand(image_embeds.shape[0], -1, -1)  # [N, Q, D]
        query_output = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds.to(qformer_dtype),
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        ).last_hidden_state[:, : self.num_query_tokens]  # [N, Q, D]
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))  # [N, Q, H]

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written onto the placeholder positions. [B, T] -> [B, T, H].

        `input_ids` may stay on the host while the model is on a GPU: the placeholder checks then run on the host,
        and nothing waits for the GPU's queued work (the generation scheduler embeds newcomers while it decodes).
        """
        table = self.language_model.get_input_embeddings()
        inputs_embeds = table(to_device_queued(input_ids, table.weight.device))
        return merge_image_features(inputs_embeds, input_ids, image_features, self.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MiniGPT4QwenOutput:
        """Loss (with `labels`) or logits (without).

        Args:
            input_ids: [B, T] with `num_query_tokens` placeholders per image.
            attention_mask: [B, T], 1 for real tokens.
            labels: [B, T] aligned with `input_ids`; -100 where nothing is learned.
            pixel_values: [N, 3, S, S], the batch's images in placeholder order; or pass `image_features`.
            image_features: [N, Q, H] precomputed `encode_images` output (e.g. cached for a frozen tower).
            position_ids: [B, T], optional (e.g. for packed sequences).
        """
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
        # Text only: the image path still joins the graph, before the embeddings as images would (ZeRO-3 gathers
        # parameters in the same order on every rank); see image_path_anchor.
        anchor = image_path_anchor(self, input_ids.device) if image_features is None else None
        inputs_embeds = self.embed(input_ids, image_features)
        if anchor is not None:
            inputs_embeds = inputs_embeds + anchor.to(inputs_embeds.dtype)
        if labels is None:
            out = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return MiniGPT4QwenOutput(logits=out.logits)
        hidden = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [B, T, H]
        loss_sum, num_tokens = masked_lm_loss_sum(
            hidden, labels, self.language_model.get_output_embeddings(), chunk_rows=self.loss_chunk_rows
        )
        return MiniGPT4QwenOutput(
            loss=loss_sum / max(num_tokens, 1), loss_sum=loss_sum, num_tokens=num_tokens
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generates continuations of left-padded prompts; returns only the new tokens, [B, new].

        Extra keyword arguments go to the LLM's `generate` (e.g. `max_new_tokens`, `do_sample`, `num_beams`,
        `eos_token_id`, `streamer`, `generation_config`).
        """
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
        inputs_embeds = self.embed(input_ids, image_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )


def part_of_key(key: str) -> str:
    """The part a state-dict key belongs to ('language_model.model.layers.0...' -> 'language_model')."""
    head = key.split(".", 1)[0]
    if head not in PART_NAMES:
        raise KeyError(f"{key!r} belongs to no model part {PART_NAMES}")
    return head
