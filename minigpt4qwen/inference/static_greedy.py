"""Fast greedy decoding for one conversation: a static KV cache and a compiled (CUDA-graph) decode step.

transformers' `generate` spends more time in Python per token than a batch-1 decode step takes on a GPU. Here
the prefill runs once (image rows merged), then each step is one compiled call that feeds its own argmax back,
and the host checks for a stop token only every `check_every` steps. Greedy only; sampling and beam search go
through `MiniGPT4Qwen.generate`. A library API (used by the benchmark): the chat front ends still decode through
`MiniGPT4Qwen.generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import StaticCache

from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


class StaticGreedyDecoder:
    """Greedy decoding of single prompts with a reusable static cache.

    Args:
        model: the model (its LLM must support transformers' `StaticCache`, as every native decoder does).
        max_cache_len: prompt + new tokens budget; the cache is allocated once at this size.
        compile: compile the decode step with CUDA graphs (`mode="reduce-overhead"`); False for CPU tests.
        check_every: decode steps between host-side checks for a stop token.
    """

    def __init__(self, model: MiniGPT4Qwen, *, max_cache_len: int = 2048, compile: bool = True, check_every: int = 16):
        self.model = model
        self.llm = model.language_model
        self.max_cache_len = max_cache_len
        self.check_every = check_every
        self.cache = StaticCache(config=self.llm.config, max_cache_len=max_cache_len)
        # transformers renamed `past_key_values` to `cache` (5.2x); pass the cache under the name this version takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values"
        self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True) if compile else self._decode_step

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = self.llm(input_ids=token, position_ids=position, use_cache=True, **{self._cache_kw: self.cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                 image_features: torch.Tensor | None = None, max_new_tokens: int = 512,
                 stop_token_ids: Sequence[int] = ()) -> torch.Tensor:
        """Greedy continuation of one unpadded prompt [1, T]; returns the new tokens [1, n] (stop token included).

        Raises:
            ValueError: a batch of several prompts, or prompt + new tokens beyond `max_cache_len`.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("StaticGreedyDecoder takes one prompt at a time; use MiniGPT4Qwen.generate for batches")
        length = input_ids.shape[1]
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceed max_cache_len {self.max_cache_len}")
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.model.encode_images(pixel_values)
        self.cache.reset()
        embeds = self.model.embed(input_ids, image_features)
        positions = torch.arange(length + max_new_tokens, device=input_ids.device)[None]  # [1, T + n]
        logits = self.llm(inputs_embeds=embeds, position_ids=positions[:, :length], use_cache=True, logits_to_keep=1,
                          **{self._cache_kw: self.cache}).logits
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]  # [1, 1] each
        stops = torch.tensor(list(stop_token_ids), device=input_ids.device)
        for step in range(1, max_new_tokens):
            if stops.numel() and step % self.check_every == 0:
                if torch.isin(torch.cat(tokens[-self.check_every:], 1), stops).any():
                    break
            # clone: a CUDA-graph output is overwritten by the next replay
            tokens.append(self._step(tokens[-1], positions[:, length + step - 1 : length + step]).clone())
        out = torch.cat(tokens, dim=1)  # [1, n]
        if stops.numel():
            hits = torch.isin(out[0], stops).nonzero()
            if hits.numel():
                out = out[:, : int(hits[0]) + 1]
        return out
