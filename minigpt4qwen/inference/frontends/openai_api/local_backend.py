"""What the HTTP server's handlers run requests on: `Backend`, and `LocalBackend` for a model in this process
(`engine_link.RemoteBackend` forwards to a model in another process)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import Conversation, PromptSpec
from minigpt4qwen.inference.frontends.streaming import ReplyStream
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


class Backend(Protocol):
    """What the app (`server.create_app`) needs: what prompts need of the model and the slot size (to build
    prompts), `submit` (the continuous-batching scheduler: raises ValueError for what it refuses), `beam` (beam
    search, alone on the model between the scheduler's steps), `stats` (for /health) and `close`. Replies are
    async-iterable text pieces with `num_tokens`, `finish_reason` and `cancel`."""

    spec: PromptSpec

    @property
    def capacity(self) -> int: ...

    def submit(self, ids: torch.Tensor, pixels: torch.Tensor | None, settings: GenerationSettings
               ) -> AsyncIterable[str]: ...

    def beam(self, conversation: Conversation, settings: GenerationSettings, window: int
             ) -> tuple[AsyncIterable[str], Callable[[], int]]: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The model and its generation scheduler, in this process.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        scheduler: the model's scheduler.
        own: close the scheduler with the backend.
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, scheduler: GenerationScheduler,
                 own: bool = False):
        self.model, self.tokenizer, self.scheduler, self.own = model, tokenizer, scheduler, own
        self.spec = PromptSpec.of(model)

    @property
    def capacity(self) -> int:
        """Tokens per slot of the scheduler (prompt + reply)."""
        return self.scheduler.capacity

    def submit(self, ids: torch.Tensor, pixels: torch.Tensor | None, settings: GenerationSettings
               ) -> GenerationHandle:
        """Queues a prompt on the scheduler (raises ValueError for what it refuses)."""
        return self.scheduler.submit(ids, pixel_values=pixels, settings=settings)

    def beam(self, conversation: Conversation, settings: GenerationSettings, window: int
             ) -> tuple[ReplyStream, Callable[[], int]]:
        """Beam search on `conversation`, run alone on the model between the scheduler's steps; returns the reply
        (text pieces, `num_tokens`, `finish_reason`, `cancel`) and its prompt length once known."""
        prompt_tokens = [0]

        def answer(session: ChatSession, job_settings: GenerationSettings, streamer: Any) -> str:
            query = session.with_image_markers(conversation.query)
            prompt_tokens[0] = int(session.build_prompt(query)[0].shape[1])
            return session.ask(query, job_settings, streamer)

        reply = ReplyStream(lambda: conversation.session(self.model, self.tokenizer, window), answer, settings,
                            lock=self.scheduler.model_lock)
        return reply, lambda: prompt_tokens[0]

    def stats(self) -> dict[str, Any]:
        """The scheduler's stats (`GenerationScheduler.stats`)."""
        return self.scheduler.stats()

    def close(self) -> None:
        """Closes the scheduler if the backend owns it."""
        if self.own:
            self.scheduler.close()
