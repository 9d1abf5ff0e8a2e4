"""The generation scheduler: one thread owns the model and decodes every request in flight together
(continuous batching), for the HTTP server, the web UI, `generate` and evaluations.

    scheduler = GenerationScheduler(model, tokenizer, slots=32, capacity=2048)
    handle = scheduler.submit(input_ids, pixel_values=pixels, settings=GenerationSettings(max_new_tokens=128))
    print(handle.result())          # or iterate it for text pieces; handle.cancel() from any thread

Each round of the loop, at a step boundary: cancelled requests leave (their slot is freed); waiting requests get
free slots, their images are encoded in one batch and their prompts embedded; one prefill forward runs one chunk
of each admitted prompt (at most `prefill_tokens` padded tokens, so the others stall for one chunk at most);
then up to `check_every` decode steps run over all decoding slots, and their tokens are read back, streamed and
checked against the stop tokens, stop strings and lengths. A request's failure (its images, its prompt, its
prefill) ends that request only.

Why not transformers' continuous batching (`generate_batch`, `ContinuousBatchingManager`, paged attention): its
requests are token ids only, so it cannot take our image rows at the placeholder positions; greedy vs sampling is
one setting for the whole manager; sampling draws from torch's global generator (no per-request seed); and its
API differs between the transformers versions we run on. Here a request's answer depends on nothing else in the
batch: each row has its own positions, attention mask and settings, and its random draws are keyed by (its seed,
its token count) (`RowChooser`), so greedy and seeded answers are those it gets alone (up to float rounding of
batched matmuls). Beam search is not batched: use `model_lock` to run it on the model between steps.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.inference.generation import GenerationSettings, StopOnText
from minigpt4qwen.inference.generation_handle import GenerationHandle
from minigpt4qwen.inference.slot_decoder import Chunk, SlotDecoder, padded_length, power_of_two
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)
RATE_WINDOW_S = 10.0


class _Job:
    """The scheduler's record of one request."""

    def __init__(self, order: int, handle: GenerationHandle, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_features: torch.Tensor | None, seed: int, max_new: int, stop: StopOnText | None):
        self.order, self.handle, self.input_ids = order, handle, input_ids
        self.pixel_values, self.image_features, self.seed = pixel_values, image_features, seed
        self.max_new, self.stop = max_new, stop
        self.settings = handle.settings
        self.embeds: torch.Tensor | None = None
        self.slot, self.prefilled = -1, 0
        self.columns = 0  # cache columns the device has written for it (decode steps run ahead of `tokens`)
        self.tokens: list[int] = []

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.input_ids)


class _ModelLock:
    """`with scheduler.model_lock:` holds the model for the caller; the loop waits at its next step boundary."""

    def __init__(self, scheduler: GenerationScheduler):
        self.scheduler, self.callers = scheduler, threading.Lock()

    def __enter__(self) -> None:
        self.callers.acquire()
        self.scheduler._pause(True)

    def __exit__(self, *exc: Any) -> None:
        self.scheduler._pause(False)
        self.callers.release()

    def locked(self) -> bool:
        return self.callers.locked()


class GenerationScheduler:
    """Owns `model` from a background thread and decodes every submitted request in batches.

    Args:
        model: the model (eval mode is set here); its LLM must have full-attention layers.
        tokenizer: its tokenizer (decodes replies; ChatML stop tokens).
        slots: requests decoded at once; more wait for a free slot.
        capacity: tokens per slot (prompt + reply); longer prompts fail, replies stop there ("length").
        cuda_graphs: replay steps from CUDA graphs (default: on a GPU).
        check_every: decode steps between looks at the tokens (streaming, stops, joins and leaves).
        prefill_tokens: the most padded tokens of one prefill forward (longer prompts are prefilled in chunks).
        stop_token_ids: tokens that end a reply (default: the tokenizer's ChatML stops).
        rehearse_captures: see `SlotDecoder` (tests).
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *, slots: int = 32,
                 capacity: int = 2048, cuda_graphs: bool | None = None, check_every: int = 8,
                 prefill_tokens: int = 2048, stop_token_ids: Sequence[int] | None = None,
                 rehearse_captures: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.decoder = SlotDecoder(model, slots=slots, capacity=capacity, cuda_graphs=cuda_graphs,
                                   check_every=check_every, prefill_tokens=prefill_tokens,
                                   rehearse_captures=rehearse_captures)
        self.stop_ids = set(chat_stop_token_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
        self.model_lock = _ModelLock(self)
        self._cond = threading.Condition()
        self._inbox: list[_Job] = []
        self._waiting: deque[_Job] = deque()
        self._slots: list[_Job] = []  # index = slot: in-use slots stay packed at the front
        self._orders = itertools.count()
        self._pausers, self._paused, self._closed = 0, False, False
        self._produced: deque[tuple[float, int]] = deque()
        self.completed = self.failed = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="minigpt4qwen-scheduler")
        self._thread.start()

    # -------------------------------------------------------------------------------- API
    @property
    def slots(self) -> int:
        return self.decoder.slots

    @property
    def capacity(self) -> int:
        return self.decoder.capacity

    def submit(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
               image_features: torch.Tensor | None = None, settings: GenerationSettings | None = None
               ) -> GenerationHandle:
        """Queues one prompt; returns at once.

        Args:
            input_ids: the prompt [T] or [1, T], with `num_query_tokens` placeholders per image.
            pixel_values: its images [N, 3, S, S] (normalised, as `ImageTransform` gives), encoded in a batch with
                other newcomers'; or
            image_features: its images already encoded [N, Q, H] (e.g. cached by a `ChatSession`).
            settings: decoding options (greedy, 512 new tokens by default); the seed makes sampling reproducible
                whatever else runs; without one a seed is drawn from torch's generator.

        Raises:
            ValueError: beam search, invalid settings, an empty or too long prompt, both or misshapen images.
            RuntimeError: the scheduler is closed.
        """
        settings = (settings or GenerationSettings()).check()
        if settings.num_beams > 1:
            raise ValueError("the scheduler does not batch beam search; run it under `scheduler.model_lock` with "
                             "MiniGPT4Qwen.generate")
        ids = input_ids.reshape(-1).to(torch.long).cpu()
        if not 0 < len(ids) < self.capacity:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a slot of {self.capacity} tokens (at least "
                             "one token must be left for the reply); shorten it or raise the slot capacity")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass the images as pixel_values or as image_features, not both")
        size = self.model.config.vision_config.image_size
        if pixel_values is not None and tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [N, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**62, ()))
        max_new = min(settings.max_new_tokens, self.capacity - len(ids))
        stop = StopOnText(self.tokenizer, settings.stop) if settings.stop else None
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation scheduler is closed")
            handle = GenerationHandle(self.tokenizer, settings, len(ids), on_cancel=self._wake)
            self._inbox.append(_Job(next(self._orders), handle, ids, pixel_values, image_features, seed, max_new, stop))
            self._cond.notify_all()
        return handle

    def stats(self) -> dict[str, Any]:
        """Slots in use, requests waiting, tokens/s over the last 10 s, requests completed and failed."""
        with self._cond:
            now = time.monotonic()
            while self._produced and self._produced[0][0] < now - RATE_WINDOW_S:
                self._produced.popleft()
            rate = sum(n for _, n in self._produced) / RATE_WINDOW_S
            return {"slots": self.slots, "active_slots": len(self._slots), "capacity": self.capacity,
                    "queued": len(self._waiting) + len(self._inbox), "tokens_per_s": round(rate, 1),
                    "completed": self.completed, "failed": self.failed}

    def close(self) -> None:
        """Stops the loop; requests not finished fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(30)

    # ------------------------------------------------------------------------- the loop
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _pause(self, on: bool) -> None:
        with self._cond:
            self._pausers += 1 if on else -1
            self._cond.notify_all()
            if on:
                self._cond.wait_for(lambda: self._paused or self._closed or not self._thread.is_alive())

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as err:  # a bug in the loop: fail every request rather than leave it hanging
            log.exception("the generation scheduler stopped")
            self._fail_all(RuntimeError(f"the generation scheduler stopped: {err}"))
            raise

    def _round(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._inbox or self._waiting or self._slots or self._closed or self._pausers)
            if self._pausers and not self._closed:
                self._paused = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pausers or self._closed)
                self._paused = False
            if self._closed:
                self._fail_all(RuntimeError("the generation scheduler was closed"))
                return False
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        return True

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self._slots, *self._waiting, *self._inbox]:
            job.handle.end("error", error)
        self._slots, self._inbox = [], []
        self._waiting.clear()

    def _finish(self, job: _Job, reason: str, error: BaseException | None = None) -> None:
        """Ends `job` and frees its slot: the last slot in use moves into it, so the slots stay packed."""
        if job.slot >= 0:
            last = self._slots.pop()
            if last is not job:
                self.decoder.move(last.slot, job.slot, min(last.columns, self.capacity))
                self._slots[job.slot], last.slot = last, job.slot
            else:
                self.decoder.release(job.slot)
            job.slot = -1
        if error is not None:
            log.warning("request failed: %s", error)
        self.completed += reason in ("stop", "length")
        self.failed += reason == "error"
        job.handle.end(reason, error)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._slots if j.handle.cancelled.is_set()]:
            self._finish(job, "cancelled")
        for job in [j for j in self._waiting if j.handle.cancelled.is_set()]:
            self._waiting.remove(job)
            self._finish(job, "cancelled")

    def _admit(self) -> None:
        """Gives free slots to waiting requests; encodes their images (one batch) and embeds their prompts."""
        admitted: list[_Job] = []
        while self._waiting and len(self._slots) < self.slots:
            job = self._waiting.popleft()
            job.slot = len(self._slots)
            self._slots.append(job)
            admitted.append(job)
        self._encode([job for job in admitted if job.pixel_values is not None])
        for job in admitted:
            if job.slot < 0:
                continue  # failed while encoding
            try:
                features = None if job.image_features is None else job.image_features.to(self.decoder.device)
                with torch.no_grad():
                    job.embeds = self.model.embed(job.input_ids[None].to(self.decoder.device), features)[0]
                s = job.settings
                self.decoder.start(job.slot, sample=s.do_sample, seed=job.seed, temperature=s.temperature,
                                   top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty)
            except Exception as err:  # e.g. placeholders that do not match the images
                self._finish(job, "error", err)

    def _encode(self, jobs: list[_Job]) -> None:
        """Encodes the images of `jobs` in one batch; on a failure, each job alone (failing only the bad one)."""
        if not jobs:
            return
        try:
            pixels = torch.cat([job.pixel_values for job in jobs]).to(self.decoder.device)
            features = self.decoder.encode_images(pixels).split([len(job.pixel_values) for job in jobs])
        except Exception as err:
            if len(jobs) == 1:
                self._finish(jobs[0], "error", err)
            else:
                for job in jobs:
                    self._encode([job])
            return
        for job, feature in zip(jobs, features, strict=True):
            job.image_features, job.pixel_values = feature, None

    def _prefill(self) -> None:
        """One prefill forward: the next chunk of as many admitted prompts as the token budget allows."""
        pending = sorted((job for job in self._slots if not job.decoding), key=lambda job: job.order)
        chunks: list[Chunk] = []
        jobs: list[_Job] = []
        for job in pending:
            size = min(len(job.input_ids) - job.prefilled, self.decoder.prefill_tokens)
            longest = max([size, *(len(chunk.embeds) for chunk in chunks)])
            if chunks and power_of_two(len(chunks) + 1) * padded_length(longest) > self.decoder.prefill_tokens:
                break
            end = job.prefilled + size
            chunks.append(Chunk(job.slot, job.embeds[job.prefilled:end], job.prefilled, end == len(job.input_ids)))
            jobs.append(job)
        if chunks:
            self._run_prefill(jobs, chunks)

    def _run_prefill(self, jobs: list[_Job], chunks: list[Chunk]) -> None:
        try:
            first = self.decoder.prefill(chunks, sample=any(job.settings.do_sample for job in jobs))
        except Exception as err:
            if len(jobs) == 1:
                self._finish(jobs[0], "error", err)
            else:  # find the culprit: each chunk alone
                for job, chunk in zip(jobs, chunks, strict=True):
                    self._run_prefill([job], [chunk])
            return
        for job, chunk, token in zip(jobs, chunks, first, strict=True):
            job.prefilled += len(chunk.embeds)
            job.columns = job.prefilled
            if chunk.final:
                job.embeds = None
                self._take(job, [token])

    def _decode(self) -> None:
        """Up to `check_every` decode steps over every decoding slot, then their tokens."""
        decoding = [job for job in self._slots if job.decoding]
        if not decoding:
            return
        steps = min(self.decoder.check_every, max(job.max_new - len(job.tokens) for job in decoding))
        longest = max(job.columns for job in decoding) + steps  # the last token is written by the first step
        try:
            tokens = self.decoder.decode(steps, len(self._slots), longest,
                                         sample=any(job.settings.do_sample for job in decoding))
        except Exception as err:  # the batch's own step failed: no request can go on
            for job in decoding:
                self._finish(job, "error", err)
            return
        for job in decoding:
            job.columns += steps
        for job, row in [(job, tokens[job.slot]) for job in decoding]:  # before a finish repacks the slots
            self._take(job, row)

    def _take(self, job: _Job, tokens: list[int]) -> None:
        """Hands `job` its new tokens up to the first stop; ends it when done."""
        reason = None
        for count, token in enumerate(tokens, 1):
            job.tokens.append(token)
            if token in self.stop_ids:
                reason = "stop"
            elif len(job.tokens) >= job.max_new:
                reason = "length"
            elif job.stop is not None and bool(job.stop(torch.tensor([job.tokens]), None)[0]):
                reason = "stop"
            if reason is not None:
                tokens = tokens[:count]
                break
        with self._cond:
            self._produced.append((time.monotonic(), len(tokens)))
        job.handle.push(tokens)
        if reason is not None:
            self._finish(job, reason)
