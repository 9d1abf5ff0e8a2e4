"""The continuous-batching scheduler alone under load: serve_load's workload, in-process, without the HTTP server.

    python -m benchmarks.scheduler_load --size 7b                     # one GPU: the whole table
    python -m benchmarks.scheduler_load --size tiny --device cpu --clients 1,4 --requests-per-client 1 --new-tokens 8

The `GenerationScheduler` that `benchmarks/serve_load.py`'s server runs (same model, options and defaults: random
weights of the chosen size, the Qwen tokenizer from tests/data, projections fused, no stop tokens, so every reply
has its full length) is driven directly from one asyncio event loop in this process: for each row, N client
coroutines each submit requests back to back (`scheduler.submit`, then `async for` over the handle's text pieces),
after one warm-up round at the same concurrency (graph captures). The request is serve_load's (a 63-token prompt
with one 224px noise PNG, greedy, 128 new tokens), turned into prompt ids and pixels once, before any timing, by
what the server runs (`ChatRequest`, `build_conversation`, `Conversation.prompt`); `--prepare-per-request` redoes
that per request inside the timed region, in a worker thread (image decoding, tokenizing: the intake cost without
HTTP). Timed: submission, the scheduler's rounds and the text pieces' decoding; not timed: HTTP, JSON, the server's
request handling (and without `--prepare-per-request`, the intake). Printed per row, comparable with serve_load's:
aggregate tokens/s, time from just before submission to the first text piece (p50 / p95), the scheduler's medians
from submission to a slot and to the first token, errors, peak GPU memory and the share of the scheduler loop's
round time spent waiting for the GPU. So the gap to serve_load's row is what the HTTP front end costs (its
parsing, and the GIL it shares with the scheduler's thread).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time

import torch

from benchmarks.common import machine, peak_gib, reset_peak
from benchmarks.serve_load_clients import summarize
from benchmarks.serve_load_server import add_workload_options, build_scheduler, request_messages, set_admission_steps
from minigpt4qwen.inference.decoding import slot_rounds


def make_prepare(model, tokenizer, scheduler):
    """payload -> (ids, pixels, settings), as the server's request handler and `_prepare` build them."""
    from minigpt4qwen.inference.frontends.openai_api.openai_protocol import ChatRequest, PromptSpec, build_conversation
    from minigpt4qwen.inference.frontends.openai_api.request_images import ImageLimits

    limits, window = ImageLimits(), min(6144, scheduler.capacity - 1)  # build_app's defaults

    def prepare(payload: dict):
        chat = ChatRequest.model_validate(payload)
        settings = chat.settings(512, 4096)  # temperature 0: greedy, max_new_tokens = max_tokens
        ids, pixels = build_conversation(chat, limits).prompt(PromptSpec.of(model), tokenizer, window)
        return ids, pixels, settings

    return prepare


async def _load(scheduler, prepare, payload: dict, prepared, clients: int, per_client: int) -> dict:
    """`clients` concurrent coroutines, each submitting `per_client` requests back to back and streaming them."""
    ttfts, tokens, errors = [], [0], [0]

    async def one_client() -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                ids, pixels, settings = prepared or await asyncio.to_thread(prepare, payload)
                handle = scheduler.submit(ids, pixel_values=pixels, settings=settings)
                first = None
                async for piece in handle:
                    if first is None and piece:
                        first = time.perf_counter() - start
                tokens[0] += handle.num_tokens
                ttfts.append(first if first is not None else time.perf_counter() - start)
            except Exception as err:  # counted, reported; the row goes on
                errors[0] += 1
                print(f"  request failed: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return summarize(ttfts, tokens[0], errors[0], wall, clients * per_client)


def _ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f}" if values else "-"


def rows(args: argparse.Namespace) -> None:
    model, tokenizer, scheduler = build_scheduler(args)
    try:
        payload = {"model": "bench", "messages": request_messages(tokenizer), "max_tokens": args.new_tokens,
                   "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        prepare = make_prepare(model, tokenizer, scheduler)
        prepared = None if args.prepare_per_request else prepare(payload)
        setup = f"{args.slots} slots x {args.slot_tokens} tokens, {args.check_every} steps a chunk, " \
            f"prefills of {args.prefill_tokens} tokens (graphs up to {args.graph_prefill_tokens})" + \
            (", compiled step" if args.compile_decode else "") + \
            (f", LLM {args.quantize} ({args.quantize_kernels})" if args.quantize else "") + \
            (f", switch interval {args.switch_interval}" if args.switch_interval else "") + \
            (", prompt prepared per request (worker thread)" if args.prepare_per_request else "")
        print(f"\n| scheduler alone, in-process, {setup}, streaming | clients | tokens/s | TTFT p50 ms | TTFT p95 ms | "
              "in the scheduler: p50 to a slot / to the first token, ms | errors | peak GiB | "
              "loop waiting for the GPU |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for clients, steps in itertools.product((int(c) for c in args.clients.split(",")),
                                                [int(s) for s in args.admission_steps.split(",")]):
            set_admission_steps(steps)
            asyncio.run(_load(scheduler, prepare, payload, prepared, clients, 1))  # warm-up: captures graphs
            scheduler.rounds.latencies.clear()
            reset_peak(args.device)
            before = scheduler.stats()
            row = asyncio.run(_load(scheduler, prepare, payload, prepared, clients, args.requests_per_client))
            after = scheduler.stats()
            latencies = list(scheduler.rounds.latencies)
            peak = f"{peak_gib(args.device):.1f}" if args.device.startswith("cuda") else "-"
            rounds = after["round_s"] - before["round_s"]
            waiting = (after["device_wait_s"] - before["device_wait_s"]) / rounds if rounds > 0 else float("nan")
            print(f"| {row['requests']} requests, {args.new_tokens} new tokens each, "
                  f"{slot_rounds.ADMISSION_STEPS} steps after an admission | {clients} | "
                  f"{row['tokens_per_s']:.0f} | {row['ttft_p50']:.0f} | {row['ttft_p95']:.0f} | "
                  f"{_ms([w for _, w, _ in latencies])} / {_ms([f for _, _, f in latencies])} | {row['errors']} | "
                  f"{peak} | {waiting:.0%} of {rounds:.1f} s |", flush=True)
    finally:
        scheduler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_options(parser)
    parser.add_argument("--prepare-per-request", action="store_true",
                        help="build each request's prompt ids and pixels inside the timed region (worker thread)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"# scheduler under load, MiniGPT4Qwen-{args.size} random weights | {machine()}")
    print(f"# python -m benchmarks.scheduler_load {' '.join(sys.argv[1:])}")
    rows(args)


if __name__ == "__main__":
    main()
