"""Turning prompts into answers: the one interface the evaluation runner talks to, and its implementation on the
generation scheduler (continuous batching, as `serve` and `generate` answer).

`SchedulerAnswerer` hands a batch to the scheduler in one piece: every request of the batch joins the scheduler's
loop in the same round, and no other request is in flight, so which requests share each prefill and decode step
depends only on the batch, never on thread timing. A batch's answers are then a function of the batch alone, as
the runner's resume guarantee needs (a batch asked again gives the same answers, float rounding included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.frontends.prompt_records import Prompt, prompt_inputs
from minigpt4qwen.inference.generation import GenerationSettings
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT


@dataclass(frozen=True)
class Request:
    """One question: the user message and its images (placed before the text, as `chat` places them)."""

    text: str
    images: tuple[Image.Image, ...]


class Answerer(Protocol):
    """What the runner needs: the side images are resized to, and answers for a batch of requests."""

    image_size: int

    def answer(self, requests: Sequence[Request]) -> list[str | Exception]:
        """One answer per request, in order; an exception in place of an answer says why that request has none
        (the runner skips and reports its question)."""
        ...


class SchedulerAnswerer:
    """Greedy answers through a `GenerationScheduler`, a batch at a time.

    Args:
        scheduler: the model's scheduler (the caller closes it); nothing else should submit to it meanwhile,
            or the batches' answers may differ in float rounding between runs.
        max_new_tokens: the answer length limit.
        system_prompt: the system message.
    """

    def __init__(self, scheduler: GenerationScheduler, max_new_tokens: int,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        self.scheduler, self.system_prompt = scheduler, system_prompt
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens).check()
        self.image_size = scheduler.model.config.vision_config.image_size

    def answer(self, requests: Sequence[Request]) -> list[str | Exception]:
        """One greedy answer per request, decoded together; a request that fails (a prompt longer than a slot, an
        out-of-memory in its prefill) gets its exception instead.

        Raises:
            RuntimeError: the scheduler is closed.
        """
        model, tokenizer = self.scheduler.model, self.scheduler.tokenizer
        # Prompt only counts a request's images to place its markers: the images themselves come decoded.
        inputs = [prompt_inputs(model, tokenizer, Prompt(index=i, id=i, query=r.text,
                                                         images=tuple(f"image {j}" for j in range(len(r.images)))),
                                r.images, self.system_prompt)
                  for i, r in enumerate(requests)]
        handles: list[GenerationHandle | Exception] = []
        try:
            with self.scheduler.model_lock:  # the loop waits at a step boundary until the whole batch is queued
                for ids, pixels in inputs:
                    try:
                        handles.append(self.scheduler.submit(ids, pixel_values=pixels, settings=self.settings))
                    except ValueError as err:  # this request only (e.g. too long for a slot)
                        handles.append(err)
            return [_result(handle) for handle in handles]
        finally:  # interrupted: free the slots (a no-op for finished requests)
            for handle in handles:
                if isinstance(handle, GenerationHandle):
                    handle.cancel()


def _result(handle: GenerationHandle | Exception) -> str | Exception:
    if isinstance(handle, Exception):
        return handle
    try:
        return handle.result()
    except Exception as err:  # its own failure; the scheduler and the other requests go on
        return err
