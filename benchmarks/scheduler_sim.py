"""The generation scheduler's policy over a simulated device: the real `GenerationScheduler` loop and `SlotRounds`
with a stand-in decoder whose work takes modelled time, driven by clients as in `scheduler_load.py`.

    python -m benchmarks.scheduler_sim --clients 32,64 --admission-steps 8,3

What it shows: how the loop's choices (chunk lengths, when rounds start, how admissions group) shape the first-token
wait and the rate, on any CPU, in seconds. The device is a clock: queued work finishes at max(the device's end of
work, now) + its cost, and a readback waits (sleeping, as the real one polls) for that moment. The host's side is
real: rounds, handles, the consumers' asyncio loop in the same process (as the server's). Costs default to a 7B
model on one H100, fitted to `scheduler_load`'s measured rows (fifth session: 2,695 tokens/s, first token p50
178 ms at 32 clients): a decode step of 10.5 ms at 32 rows, 27 us per padded prefill token, 1 ms per image. A
model, not a measurement: what it suggests is checked on the GPU with `scheduler_load` / `serve_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import types
from unittest import mock

import torch

from benchmarks.common import machine
from benchmarks.serve_load_server import TOKENIZER
from minigpt4qwen.inference.decoding import scheduler, slot_rounds
from minigpt4qwen.inference.decoding.slot_decoder import LEAD_STEPS, padded_length, power_of_two
from minigpt4qwen.inference.generation import GenerationSettings
from minigpt4qwen.text.qwen_tokenizer import build_qwen1_tokenizer

PROMPT_TOKENS, QUERY_TOKENS, STOP = 63, 32, 151643


class _Clock:
    """The simulated device: one queue of work, in wall-clock time."""

    def __init__(self):
        self.free_at, self.lock = 0.0, threading.Lock()

    def queue(self, seconds: float) -> float:
        """Queues work of `seconds`; returns when it ends."""
        with self.lock:
            self.free_at = max(self.free_at, time.perf_counter()) + seconds
            return self.free_at


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


class _Mark:
    def __init__(self, moment: float):
        self.moment = moment

    def wait(self) -> None:
        _sleep_until(self.moment)


class _Readback:
    def __init__(self, rows: list[list[int]], done: float, nearly: _Mark | None = None):
        self.rows, self.done, self.nearly = rows, done, nearly

    def tolist(self) -> list[list[int]]:
        _sleep_until(self.done)
        return self.rows


class SimulatedDecoder:
    """`SlotDecoder`'s interface as `SlotRounds` uses it; every launch costs modelled device time."""

    def __init__(self, model, *, slots: int, capacity: int, check_every: int, prefill_tokens: int,
                 costs: argparse.Namespace, clock: _Clock, **_):
        self.slots, self.capacity, self.check_every, self.prefill_tokens = slots, capacity, check_every, prefill_tokens
        self.device, self.costs, self.clock, self.launches = torch.device("cpu"), costs, clock, 0

    def step_s(self, rows: int) -> float:
        """A decode step over a bucket of `rows`: weights read once, plus keys/values growing with the rows."""
        bucket = power_of_two(rows)
        return self.costs.step_ms / 1000 * (1 - self.costs.rows_share + self.costs.rows_share * bucket / 32)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.clock.queue(self.costs.image_ms / 1000 * power_of_two(len(pixel_values)) + 0.002)
        return torch.zeros(len(pixel_values), QUERY_TOKENS, 4)

    def launch_prefill(self, chunks, sample: bool) -> _Readback:
        tokens = power_of_two(len(chunks)) * padded_length(max(len(chunk.embeds) for chunk in chunks))
        done = self.clock.queue(tokens * self.costs.prefill_us / 1e6 + 0.001)
        return _Readback([[1000] if chunk.final else [-1] for chunk in chunks], done)

    def launch_decode(self, steps: int, rows: int, longest: int, sample: bool) -> _Readback:
        step = self.step_s(rows)
        done = self.clock.queue(steps * step)
        self.launches += 1  # distinct tokens per chunk: the handles' text keeps growing
        tokens = [1001 + (self.launches + i) % 500 for i in range(steps)]
        return _Readback([tokens] * rows, done, _Mark(done - min(LEAD_STEPS, steps) * step))

    def start(self, slot: int, **_) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def move(self, source: int, target: int, length: int) -> None:
        pass


class _Model:
    """What the scheduler asks of the model: eval(), the image size, and prompt embedding."""

    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=8))

    def eval(self):
        return self

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(1, input_ids.shape[1], 4)


def _hold_the_interpreter(seconds: float) -> None:
    """Python work of `seconds` (holding the GIL, as parsing and image decoding in the server do)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_row(clients: int, admission_steps: int, args: argparse.Namespace, tokenizer) -> dict[str, float]:
    """`clients` asyncio clients, each `requests` requests back to back after a warm-up one."""
    clock = _Clock()

    def decoder(model, **kwargs):
        return SimulatedDecoder(model, costs=args, clock=clock, **kwargs)

    with mock.patch.object(scheduler, "SlotDecoder", decoder), \
            mock.patch.object(slot_rounds, "ADMISSION_STEPS", admission_steps):
        loop = scheduler.GenerationScheduler(_Model(), tokenizer, slots=args.slots, capacity=args.slot_tokens,
                                             check_every=args.check_every, prefill_tokens=args.prefill_tokens,
                                             stop_token_ids=[STOP])
        ids = torch.arange(PROMPT_TOKENS)
        ids[5:5 + QUERY_TOKENS] = 0
        pixels = torch.zeros(1, 3, 8, 8)
        first_tokens: list[float] = []
        settings = GenerationSettings(max_new_tokens=args.new_tokens)

        async def client() -> None:
            for request in range(args.requests + 1):
                start = time.perf_counter()
                _hold_the_interpreter(args.intake_ms / 1000)  # the server's intake, on the consumers' event loop
                handle = loop.submit(ids, pixel_values=pixels, settings=settings)
                first = None
                async for _ in handle:
                    first = first or time.perf_counter() - start
                if request:
                    first_tokens.append(first)

        async def all_clients() -> float:
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter()

        start = time.perf_counter()
        end = asyncio.run(all_clients())
        stats = loop.stats()
        loop.close()
    ordered = sorted(first_tokens)
    return {"tokens_per_s": clients * (args.requests + 1) * args.new_tokens / (end - start),
            "p50": 1000 * statistics.median(ordered), "p95": 1000 * ordered[int(0.95 * (len(ordered) - 1))],
            "slot_wait": stats["slot_wait_ms_p50"], "device_share": stats["device_wait_s"] / stats["round_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="32,64")
    parser.add_argument("--admission-steps", default="8,3", help="decode steps queued by a round that admits "
                        "newcomers (slot_rounds.ADMISSION_STEPS; check_every: no shorter chunk)")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per client")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--slot-tokens", type=int, default=256)
    parser.add_argument("--check-every", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--step-ms", type=float, default=10.5, help="a decode step at 32 rows")
    parser.add_argument("--rows-share", type=float, default=0.35, help="share of a 32-row step that scales with "
                        "the rows (keys and values, sampling)")
    parser.add_argument("--prefill-us", type=float, default=27.0, help="per padded prefill token")
    parser.add_argument("--image-ms", type=float, default=1.0, help="per image of a padded encoder batch")
    parser.add_argument("--intake-ms", type=float, default=0.0, help="host work per request before its submission, "
                        "on the clients' event loop (an HTTP server's intake: ~2-3 ms)")
    args = parser.parse_args()
    tokenizer = build_qwen1_tokenizer(TOKENIZER)
    print(f"# scheduler over a simulated device: decode step {args.step_ms} ms at 32 rows, prefill "
          f"{args.prefill_us} us/token, image {args.image_ms} ms, intake {args.intake_ms} ms; 63-token prompts, "
          f"{args.new_tokens} new tokens | host: {machine()}")
    print("| clients | admission steps | tokens/s | first token p50 / p95 ms | to a slot p50 ms | loop waiting for "
          "the device |\n| --- | --- | --- | --- | --- | --- |")
    for clients in (int(c) for c in args.clients.split(",")):
        for steps in (int(s) for s in args.admission_steps.split(",")):
            row = run_row(clients, steps, args, tokenizer)
            print(f"| {clients} | {steps} | {row['tokens_per_s']:.0f} | {row['p50']:.0f} / {row['p95']:.0f} | "
                  f"{row['slot_wait']} | {100 * row['device_share']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
