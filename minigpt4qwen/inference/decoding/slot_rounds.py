"""One round of the generation scheduler's loop over its slots: who gets a slot, what is prefilled, what is decoded.

Each round, at a step boundary: cancelled requests leave (their slot is freed and the last slot in use moves into
it, so the slots stay packed at the front); waiting requests get free slots, their images are encoded in one batch
and their prompts embedded; one prefill forward runs the next chunk of each admitted prompt (at most
`prefill_tokens` padded tokens, so the others stall for one chunk at most); then a chunk of up to `check_every`
decode steps over every decoding slot is queued.

The device is kept one chunk ahead of the host: a round queues its chunk *before* it reads the previous round's
tokens, hands them out and checks them against the stop tokens, stop strings and lengths. So the GPU decodes while
the host streams text and admits newcomers, instead of idling through that work after every chunk. A round starts
when the chunk in flight is `LEAD_STEPS` steps from its end (`wait_for_device`), not at once: a newcomer's prefill
then waits behind those steps only, not behind a whole chunk queued ahead of it. The price: a
request that ends in one chunk has been given a place in the next (its tokens there are dropped), and the host's
bookkeeping runs on what has been *queued* (`Job.columns`, `Job.issued`), not on what has been read back.
A round that admits newcomers queues a short chunk (`ADMISSION_STEPS`), so the rest of their burst joins soon.
A request's failure (its images, its prompt, its prefill) ends that request only; a failure of a batched decode
step ends the requests in it.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections import deque
from collections.abc import Iterable

import torch

from minigpt4qwen.inference.decoding.job import Job
from minigpt4qwen.inference.decoding.readback import Readback
from minigpt4qwen.inference.decoding.slot_decoder import LEAD_STEPS, Chunk, SlotDecoder, padded_length, power_of_two
from minigpt4qwen.model.device_copy import to_device_queued
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)
RATE_WINDOW_S = 10.0
# Decode steps queued by a round that admitted newcomers. A burst of requests reaches the loop over a few ms and a
# round takes only those already there; after this chunk the next round (LEAD_STEPS before its end) is one step
# away, not check_every - LEAD_STEPS (~60 ms at 32 rows of 7B). Modelled in benchmarks/scheduler_sim.py.
ADMISSION_STEPS = LEAD_STEPS + 1


@dataclasses.dataclass
class _Queued:
    """Work queued on the device: the readback of its tokens and the jobs of its rows (each row's slot at the time:
    a job may move to another slot before the tokens are read)."""

    tokens: Readback
    jobs: list[Job]
    rows: list[int]


class SlotRounds:
    """The slots of a `SlotDecoder` and the requests waiting for one; `run` does one round. Used by one thread.

    Args:
        model: the model (embeds the prompts).
        decoder: the batched decoder.
        stop_ids: tokens that end a reply.
    """

    def __init__(self, model: MiniGPT4Qwen, decoder: SlotDecoder, stop_ids: set[int]):
        self.model, self.decoder, self.stop_ids = model, decoder, stop_ids
        self.waiting: deque[Job] = deque()
        self.slots: list[Job] = []  # index = slot: in-use slots stay packed at the front
        self.in_flight: _Queued | None = None  # the chunk of decode steps queued last round, not yet read
        self.produced: deque[tuple[float, int]] = deque()  # (time, tokens) handed out
        # Per request, when its first token was handed out (monotonic), and seconds from its submission to getting a
        # slot and to its first token: where the time to first token goes.
        self.latencies: deque[tuple[float, float, float]] = deque(maxlen=4096)
        self.completed = self.failed = 0
        # Seconds spent in rounds, and in them waiting for the device's tokens: a share near 1 means the GPU is what
        # limits the rate; near 0, the host (the GPU then idles between chunks).
        self.round_s = self.device_wait_s = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.slots or self.in_flight)

    def run(self, newcomers: Iterable[Job]) -> None:
        """One round: newcomers queue up, cancelled requests leave, free slots are filled, one prefill forward and
        one chunk of decode steps are queued; then the previous chunk's tokens and the prefill's first tokens are
        read and handed out while the new chunk runs."""
        start = time.perf_counter()
        self.waiting.extend(newcomers)
        self._drop_cancelled()
        admitted = self._admit()
        prefills = self._queue_prefill()
        steps = min(ADMISSION_STEPS, self.decoder.check_every) if admitted else self.decoder.check_every
        previous, self.in_flight = self.in_flight, self._queue_decode(steps)
        if previous is not None:
            self._hand_out(previous)
        for queued in prefills:
            self._hand_out(queued)
        self.round_s += time.perf_counter() - start

    def wait_for_device(self) -> None:
        """Waits until the chunk in flight is `LEAD_STEPS` steps from its end: the next round, queued then, keeps the
        device busy, and a newcomer admitted in it waits for those steps only."""
        if self.in_flight is not None and self.in_flight.tokens.nearly is not None:
            start = time.perf_counter()
            try:
                self.in_flight.tokens.nearly.wait()
            except Exception:  # the device failed: reading the chunk's tokens fails its requests (`_hand_out`)
                pass
            waited = time.perf_counter() - start
            self.round_s += waited
            self.device_wait_s += waited

    def first_token_ms(self) -> dict[str, float | None]:
        """Medians over the last 10 seconds (safe from any thread): milliseconds from submission to a slot and to
        the first token."""
        since = time.monotonic() - RATE_WINDOW_S
        recent = [(wait, first) for t, wait, first in list(self.latencies) if t >= since]
        if not recent:
            return {"slot_wait_ms_p50": None, "first_token_ms_p50": None}
        return {"slot_wait_ms_p50": round(1000 * statistics.median(w for w, _ in recent), 1),
                "first_token_ms_p50": round(1000 * statistics.median(f for _, f in recent), 1)}

    def drain(self) -> None:
        """Reads and hands out the chunk in flight (before the model is lent to someone else)."""
        previous, self.in_flight = self.in_flight, None
        if previous is not None:
            self._hand_out(previous)

    def fail_all(self, error: BaseException, others: Iterable[Job] = ()) -> None:
        """Ends every request (in slots, waiting, and `others`) with `error`."""
        for job in [*self.slots, *self.waiting, *others]:
            job.handle.end("error", error)
        self.slots = []
        self.waiting.clear()
        self.in_flight = None

    def tokens_per_s(self) -> float:
        """Tokens handed out per second over the last 10 seconds (safe from any thread)."""
        since = time.monotonic() - RATE_WINDOW_S
        return sum(n for t, n in list(self.produced) if t >= since) / RATE_WINDOW_S

    def _finish(self, job: Job, reason: str, error: BaseException | None = None) -> None:
        """Ends `job` and frees its slot: the last slot in use moves into it, so the slots stay packed (the move is
        queued behind the chunk in flight, so it carries that chunk's keys and values too)."""
        if job.slot >= 0:
            last = self.slots.pop()
            if last is not job:
                self.decoder.move(last.slot, job.slot, min(last.columns, self.decoder.capacity))
                self.slots[job.slot], last.slot = last, job.slot
            else:
                self.decoder.release(job.slot)
            job.slot = -1
        if error is not None:
            log.warning("request failed: %s", error)
        self.completed += reason in ("stop", "length")
        self.failed += reason == "error"
        job.ended = True
        job.handle.end(reason, error)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.slots if j.handle.cancelled.is_set()]:
            self._finish(job, "cancelled")
        for job in [j for j in self.waiting if j.handle.cancelled.is_set()]:
            self.waiting.remove(job)
            self._finish(job, "cancelled")

    def _admit(self) -> int:
        """Gives free slots to waiting requests; encodes their images (one batch) and embeds their prompts. Returns
        how many were admitted."""
        admitted: list[Job] = []
        while self.waiting and len(self.slots) < self.decoder.slots:
            job = self.waiting.popleft()
            job.slot, job.admitted = len(self.slots), time.perf_counter()
            self.slots.append(job)
            admitted.append(job)
        self._encode([job for job in admitted if job.pixel_values is not None])
        for job in admitted:
            if job.ended:
                continue  # failed while encoding
            try:
                features = job.image_features
                if features is not None:  # given by the caller: maybe still on the host
                    features = to_device_queued(features, self.decoder.device)
                with torch.no_grad():
                    job.embeds = self.model.embed(job.input_ids[None], features)[0]  # checked on the host
                s = job.settings
                self.decoder.start(job.slot, sample=s.do_sample, seed=job.seed, temperature=s.temperature,
                                   top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty)
            except Exception as err:  # e.g. placeholders that do not match the images
                self._finish(job, "error", err)
        return len(admitted)

    def _encode(self, jobs: list[Job]) -> None:
        """Encodes the images of `jobs` in one batch; on a failure, each job alone (failing only the bad one)."""
        if not jobs:
            return
        try:
            pixels = to_device_queued(torch.cat([job.pixel_values for job in jobs]), self.decoder.device)
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

    def _queue_prefill(self) -> list[_Queued]:
        """Queues one prefill forward: the next chunk of as many admitted prompts as the token budget allows."""
        pending = sorted((job for job in self.slots if not job.decoding), key=lambda job: job.order)
        chunks: list[Chunk] = []
        jobs: list[Job] = []
        for job in pending:
            size = min(len(job.input_ids) - job.prefilled, self.decoder.prefill_tokens)
            longest = max([size, *(len(chunk.embeds) for chunk in chunks)])
            if chunks and power_of_two(len(chunks) + 1) * padded_length(longest) > self.decoder.prefill_tokens:
                break
            end = job.prefilled + size
            chunks.append(Chunk(job.slot, job.embeds[job.prefilled:end], job.prefilled, end == len(job.input_ids)))
            jobs.append(job)
        return self._try_prefill(jobs, chunks) if chunks else []

    def _try_prefill(self, jobs: list[Job], chunks: list[Chunk]) -> list[_Queued]:
        try:
            first = self.decoder.launch_prefill(chunks, sample=any(job.settings.do_sample for job in jobs))
        except Exception as err:
            if len(jobs) == 1:
                self._finish(jobs[0], "error", err)
                return []
            # Find the culprit: each chunk alone. A failure frees its slot and the last job moves into it, so each
            # chunk is re-aimed at its job's slot of the moment.
            queued: list[_Queued] = []
            for job, chunk in zip(jobs, chunks, strict=True):
                if not job.ended:
                    queued += self._try_prefill([job], [dataclasses.replace(chunk, slot=job.slot)])
            return queued
        for job, chunk in zip(jobs, chunks, strict=True):
            job.prefilled += len(chunk.embeds)
            job.columns = job.prefilled
            if chunk.final:
                job.embeds, job.issued = None, 1
        return [_Queued(first, jobs, list(range(len(jobs))))]

    def _queue_decode(self, most_steps: int) -> _Queued | None:
        """Queues up to `most_steps` decode steps over every decoding slot (rows whose queued tokens already reach
        their limit run along when others need steps; their extra tokens are dropped)."""
        decoding = [job for job in self.slots if job.decoding]
        wanted = [job.max_new - job.issued for job in decoding if job.issued < job.max_new]
        if not wanted:
            return None
        steps = min(most_steps, max(wanted))
        longest = max(job.columns for job in decoding) + steps  # the last token is written by the first step
        try:
            tokens = self.decoder.launch_decode(steps, len(self.slots), longest,
                                                sample=any(job.settings.do_sample for job in decoding))
        except Exception as err:  # the batch's own step failed: no request can go on
            for job in decoding:
                self._finish(job, "error", err)
            return None
        for job in decoding:
            job.columns += steps
            job.issued += steps
        return _Queued(tokens, decoding, [job.slot for job in decoding])

    def _hand_out(self, queued: _Queued) -> None:
        """Reads the tokens of queued work and hands each job its own (none to jobs that have ended since)."""
        start = time.perf_counter()
        try:
            rows = queued.tokens.tolist()
            self.device_wait_s += time.perf_counter() - start
        except Exception as err:  # the device failed while running it
            for job in queued.jobs:
                if not job.ended:
                    self._finish(job, "error", err)
            return
        for job, row in zip(queued.jobs, queued.rows, strict=True):
            if not job.ended and rows[row][0] != -1:  # -1: a prefill chunk that does not end its prompt
                self._take(job, rows[row])

    def _take(self, job: Job, tokens: list[int]) -> None:
        """Hands `job` its new tokens up to the first stop; ends it when done."""
        if not job.tokens:  # its first token
            first = time.perf_counter() - job.submitted
            self.latencies.append((time.monotonic(), job.admitted - job.submitted, first))
        reason = None
        for count, token in enumerate(tokens, 1):
            job.tokens.append(token)
            # A stop string the last allowed token completes is a stop, as a stop token is (OpenAI's "stop").
            if token in self.stop_ids or (
                    job.stop is not None and bool(job.stop(torch.tensor([job.tokens[-job.stop.tail:]]), None)[0])):
                reason = "stop"
            elif len(job.tokens) >= job.max_new:
                reason = "length"
            if reason is not None:
                tokens = tokens[:count]
                break
        self.produced.append((time.monotonic(), len(tokens)))
        while self.produced[0][0] < time.monotonic() - RATE_WINDOW_S:
            self.produced.popleft()
        job.handle.push(tokens)
        if reason is not None:
            self._finish(job, reason)
