"""The chat engine's fast path: replies through `GraphDecoder`, with the same stop tokens, stop strings,
cancellation and streaming as the `generate` path (and, greedy, the same reply)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.generation import CancelFlag, GenerationSettings, StopOnText


def fast_path_applies(settings: GenerationSettings) -> bool:
    """Whether `GraphDecoder` can answer with `settings`: everything but beam search."""
    return settings.num_beams == 1


def generate_fast(decoder: GraphDecoder, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                    image_features: torch.Tensor | None, settings: GenerationSettings, cancel: CancelFlag,
                    streamer: Any = None) -> torch.Tensor:
    """The new ids [1, n] of a reply (stop id included); greedy, the ids `MiniGPT4Qwen.generate` gives.

    Args:
        decoder: the model's decoder.
        tokenizer: the model's tokenizer (ChatML stop ids).
        input_ids: the prompt [1, T].
        image_features: its images' features [N, Q, H], or None.
        settings: checked settings without beams (`fast_path_applies`); the seed, if any, is applied here.
        cancel: polled between chunks of tokens.
        streamer: a transformers streamer: gets the (empty) prompt, the tokens in chunks, then `end()` (on
            success; on an error the caller ends it).
    """
    text_stop = StopOnText(tokenizer, settings.stop) if settings.stop else None
    new: list[int] = []

    def on_tokens(chunk: list[int]) -> None:
        new.extend(chunk)
        if streamer is not None and chunk:
            streamer.put(torch.tensor(chunk))

    def should_stop() -> bool:
        if cancel.poll():
            return True
        return text_stop is not None and bool(text_stop(torch.tensor([new]), None)[0])

    if streamer is not None:  # the way `generate` feeds a streamer: the prompt (none: embeddings), then tokens
        streamer.put(input_ids[:, :0].cpu())
    ids = decoder.generate(input_ids, image_features=image_features, max_new_tokens=settings.max_new_tokens,
                           stop_token_ids=chat_stop_token_ids(tokenizer), on_tokens=on_tokens, should_stop=should_stop,
                           do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p,
                           top_k=settings.top_k, repetition_penalty=settings.repetition_penalty, seed=settings.seed)
    if streamer is not None:
        streamer.end()
    return ids
