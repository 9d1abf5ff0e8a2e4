"""The generation scheduler: one thread owns the model and decodes every request in flight together
(continuous batching). `serve` uses it; the web UI, `generate` and evaluations can submit to it the same way.

    scheduler = GenerationScheduler(model, tokenizer, slots=32, capacity=2048)
    handle = scheduler.submit(input_ids, pixel_values=pixels, settings=GenerationSettings(max_new_tokens=128))
    print(handle.result())          # or iterate it for text pieces; handle.cancel() from any thread

Requests join and leave at step boundaries: each round of the loop (`SlotRounds`) frees the slots of finished and
cancelled requests, gives free slots to waiting ones (their images encoded in one batch), queues one prefill chunk
and up to `check_every` decode steps of every decoding slot (replayed from CUDA graphs on a GPU), and hands out the
tokens of the previous round's steps while these run.

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
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.decoding.job import Job
from minigpt4qwen.inference.decoding.slot_decoder import SlotDecoder
from minigpt4qwen.inference.decoding.slot_rounds import SlotRounds
from minigpt4qwen.inference.generation import GenerationSettings, StopOnText
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)


def check_request(input_ids: torch.Tensor, pixel_values: torch.Tensor | None, settings: GenerationSettings | None,
                  *, capacity: int, image_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None, GenerationSettings]:
    """What `GenerationScheduler.submit` refuses, checked where the request is made (also in a front-end process).

    Returns:
        The prompt as a flat CPU LongTensor, the pixel values (None for none, also for an empty batch) and the
        checked settings (defaults for None).

    Raises:
        ValueError: beam search, invalid settings, an empty or too long prompt, misshapen images.
    """
    settings = (settings or GenerationSettings()).check()
    if settings.num_beams > 1:
        raise ValueError("the scheduler does not batch beam search; run it under `scheduler.model_lock` with "
                         "MiniGPT4Qwen.generate")
    ids = input_ids.reshape(-1).to(torch.long).cpu()
    if not 0 < len(ids) < capacity:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit a slot of {capacity} tokens (at least one "
                         "token must be left for the reply); shorten it or raise the slot capacity")
    if pixel_values is not None and pixel_values.shape[0] == 0:  # no images, as the model's own forward reads it
        pixel_values = None
    if pixel_values is not None and tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"pixel_values must be [N, 3, {image_size}, {image_size}], got {tuple(pixel_values.shape)}")
    return ids, pixel_values, settings


class SchedulerUnavailable(RuntimeError):
    """The scheduler (or the model's process behind an HTTP front end) takes no more requests: it was closed, or it
    stopped or is gone. A server answers 503."""


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
        graph_prefill_tokens: prefill forwards up to this many padded tokens replay CUDA graphs (larger ones launch
            their kernels from the loop's thread, which holds the GIL meanwhile).
        stop_token_ids: tokens that end a reply (default: the tokenizer's ChatML stops).
        compile_mode: compile the decode step (see `SlotDecoder`): fused kernels after a minute or two of
            compiling, in `warm_up` (or else when the first requests arrive).
        rehearse_captures: see `SlotDecoder` (tests).
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *, slots: int = 32,
                 capacity: int = 2048, cuda_graphs: bool | None = None, check_every: int = 8,
                 prefill_tokens: int = 2048, graph_prefill_tokens: int = 512,
                 stop_token_ids: Sequence[int] | None = None,
                 compile_mode: str | None = None, rehearse_captures: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.decoder = SlotDecoder(model, slots=slots, capacity=capacity, cuda_graphs=cuda_graphs,
                                   check_every=check_every, prefill_tokens=prefill_tokens,
                                   graph_prefill_tokens=graph_prefill_tokens,
                                   compile_mode=compile_mode, rehearse_captures=rehearse_captures)
        stop_ids = set(chat_stop_token_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
        self.rounds = SlotRounds(model, self.decoder, stop_ids)
        self.model_lock = _ModelLock(self)
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._orders = itertools.count()
        self._pausers, self._paused, self._closed = 0, False, False
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
            SchedulerUnavailable: the scheduler is closed.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass the images as pixel_values or as image_features, not both")
        ids, pixel_values, settings = check_request(input_ids, pixel_values, settings, capacity=self.capacity,
                                                    image_size=self.model.config.vision_config.image_size)
        seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**62, ()))
        max_new = min(settings.max_new_tokens, self.capacity - len(ids))
        stop = StopOnText(self.tokenizer, settings.stop) if settings.stop else None
        with self._cond:
            if self._closed:
                raise SchedulerUnavailable("the generation scheduler is closed")
            handle = GenerationHandle(self.tokenizer, settings, len(ids), on_cancel=self._wake)
            self._inbox.append(Job(next(self._orders), handle, ids, pixel_values, image_features, seed, max_new, stop))
            self._cond.notify_all()
        return handle

    def warm_up(self, show_progress: bool = False) -> int:
        """Prepares every decode step now, with the loop paused (`SlotDecoder.warm_up`; nothing to do without CUDA
        graphs): call before taking requests, so that none waits for a graph capture or a compile. Returns the steps
        prepared."""
        with self.model_lock, tqdm(desc="preparing the decode steps", unit="step", dynamic_ncols=True,
                                   disable=not show_progress or not self.decoder.cuda_graphs) as bar:
            def report(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            return self.decoder.warm_up(report)

    def stats(self) -> dict[str, Any]:
        """Slots in use, requests waiting, tokens/s over the last 10 s, requests completed and failed, the loop's
        seconds in rounds and waiting in them for the GPU since start (their ratio near 1: the GPU limits the rate;
        near 0: the host does, and the GPU idles between chunks), and the median milliseconds from submission to a
        slot and to the first token over the last 10 s (None without requests)."""
        rounds = self.rounds
        return {"slots": self.slots, "active_slots": len(rounds.slots), "capacity": self.capacity,
                "queued": len(rounds.waiting) + len(self._inbox), "tokens_per_s": round(rounds.tokens_per_s(), 1),
                "completed": rounds.completed, "failed": rounds.failed, "round_s": round(rounds.round_s, 3),
                "device_wait_s": round(rounds.device_wait_s, 3), **rounds.first_token_ms()}

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
            with self._cond:
                self._closed = True  # later submissions are refused, not left waiting
                self.rounds.fail_all(RuntimeError(f"the generation scheduler stopped: {err}"), self._inbox)
                self._inbox = []
                self._cond.notify_all()
            raise

    def _round(self) -> bool:
        self.rounds.wait_for_device()  # newcomers that arrive meanwhile join this round
        with self._cond:
            self._cond.wait_for(lambda: self._inbox or self.rounds.busy or self._closed or self._pausers)
            pausing = self._pausers and not self._closed
        if pausing:
            # The chunk in flight is handed out before the model is lent; outside the condition, so that `submit`
            # and `cancel` are not held up while the device finishes it.
            self.rounds.drain()
            with self._cond:
                self._paused = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pausers or self._closed)
                self._paused = False
        with self._cond:
            if self._closed:
                self.rounds.fail_all(RuntimeError("the generation scheduler was closed"), self._inbox)
                self._inbox = []
                return False
            newcomers, self._inbox = self._inbox, []
        self.rounds.run(newcomers)
        return True
