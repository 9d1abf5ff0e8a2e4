"""Turning prompts into answers: the one interface the evaluation runner talks to.

`BatchAnswerer` answers a batch in one left-padded, greedy `generate` call (`inference.frontends.batch.generate_batch`);
an answerer built on the serving scheduler only has to offer the same `image_size` and `answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.frontends.batch import Prompt, generate_batch
from minigpt4qwen.inference.generation import GenerationSettings
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT


@dataclass(frozen=True)
class Request:
    """One question: the user message and its images (placed before the text, as `chat` places them)."""

    text: str
    images: tuple[Image.Image, ...]


class Answerer(Protocol):
    """What the runner needs: the side images are resized to, and answers for a batch of requests."""

    image_size: int

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """One answer per request, in order."""
        ...


class BatchAnswerer:
    """Greedy answers through transformers' batched `generate`.

    Args:
        model: the model, on its device(s).
        tokenizer: its tokenizer.
        max_new_tokens: the answer length limit.
        system_prompt: the system message.
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens).check()
        self.image_size = model.config.vision_config.image_size

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """One greedy answer per request, generated together."""
        # Prompt only counts a record's images to place its markers: the images themselves come decoded.
        prompts = [Prompt(index=i, id=i, query=r.text, images=tuple(f"image {j}" for j in range(len(r.images))))
                   for i, r in enumerate(requests)]
        return generate_batch(self.model, self.tokenizer, prompts, [list(r.images) for r in requests],
                              self.settings, self.system_prompt)
