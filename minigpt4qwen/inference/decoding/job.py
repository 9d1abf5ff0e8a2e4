"""The generation scheduler's record of one request."""

from __future__ import annotations

import time

import torch

from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.generation import StopOnText


class Job:
    """The scheduler's record of one request (its prompt, images, seed, slot and progress)."""

    def __init__(self, order: int, handle: GenerationHandle, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_features: torch.Tensor | None, seed: int, max_new: int, stop: StopOnText | None):
        self.order, self.handle, self.input_ids = order, handle, input_ids
        self.submitted = self.admitted = time.perf_counter()
        self.pixel_values, self.image_features, self.seed = pixel_values, image_features, seed
        self.max_new, self.stop = max_new, stop
        self.settings = handle.settings
        self.embeds: torch.Tensor | None = None
        self.slot, self.prefilled = -1, 0  # prefilled: prompt tokens whose prefill is queued
        self.columns = 0  # cache columns written by the work queued for it
        self.issued = 0  # tokens the queued work produces for it (ahead of `tokens`, which were read back)
        self.tokens: list[int] = []
        self.ended = False

    @property
    def decoding(self) -> bool:
        """Its prompt's last chunk is queued: the device decodes it from then on."""
        return self.prefilled == len(self.input_ids)
