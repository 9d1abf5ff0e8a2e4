"""Serving under load: the OpenAI-compatible server (continuous batching) driven over HTTP by concurrent clients.

    python -m benchmarks.serve_load --size 7b                         # one GPU: the whole table, baseline included
    python -m benchmarks.serve_load --size tiny --device cpu          # a smoke test of the script itself

A server process runs what `minigpt4qwen serve` runs (`build_app` over a `GenerationScheduler`, uvicorn) on a
random-weight model of the chosen size, with the Qwen tokenizer from tests/data and no stop tokens, so every reply
is forced to its full length. Clients of the official `openai` client (asyncio, streaming, spread over
--client-processes processes: `serve_load_clients.py`) drive it: for each row, N clients each send requests back to
back (a 63-token prompt with one 224px image, greedy, 128 new tokens), after one warm-up round at the same
concurrency (graph captures). Printed per row: aggregate tokens/s (all generated tokens over the wall time), time to
first text piece (p50 / p95), the server's medians from a request's arrival to its submission to the scheduler
(reading, parsing, image decoding, tokenizing) and to its first text piece (lower bounds: see
`serve_load_server.py`), the scheduler's own from submission to a slot and to the first token (so each part of the
client's wait is accounted for: the rest is the client and the network), errors, and the server's peak GPU memory.
`--loop`, `--http` and `--switch-interval` set the server's uvicorn event loop, HTTP parser and Python thread switch
interval (the scheduler's thread and the HTTP server's share one interpreter). Beside it: transformers' static-cache
`generate` on one pre-formed batch of 32 (same workload).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import torch

from benchmarks.common import machine, peak_gib, reset_peak, sync
from benchmarks.serve_load_clients import run_clients
from benchmarks.serve_load_server import (
    TOKENIZER,
    add_workload_options,
    model_and_tokenizer,
    request_messages,
    run_server,
    set_admission_steps,
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            _get(f"{url}/health")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server did not answer within {timeout:.0f} s")


def _engine_counters(health: dict, start: float, end: float) -> dict:
    """/bench/counters' figures from the engine's stats (`serve_load_server` adds its latencies and peak to them);
    the front end's intake and first-text times are not measured in that setup."""
    latencies = [(wait, first) for t, wait, first in health["bench_latencies"] if start <= t <= end]

    def median_ms(values: list[float]) -> float | None:
        return 1000 * statistics.median(values) if values else None

    return {"peak_gib": health["bench_peak_gib"], "intake_ms": None, "first_text_ms": None,
            "slot_wait_ms": median_ms([w for w, _ in latencies]),
            "first_token_ms": median_ms([f for _, f in latencies])}


def server_rows(args: argparse.Namespace) -> None:
    from minigpt4qwen.text.qwen_tokenizer import build_qwen1_tokenizer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "benchmarks.serve_load", "--role", "server", "--size", args.size, "--device",
               args.device, "--port", str(port), "--slots", str(args.slots), "--slot-tokens", str(args.slot_tokens),
               "--check-every", str(args.check_every), "--prefill-tokens", str(args.prefill_tokens),
               "--admission-steps", str(args.admission_steps),
               "--graph-prefill-tokens", str(args.graph_prefill_tokens),
               *(["--quantize", args.quantize, "--quantize-kernels", args.quantize_kernels] if args.quantize else []),
               *(["--compile-decode"] if args.compile_decode else []),
               "--frontend-processes", str(args.frontend_processes)]
    server_options = [("loop", args.loop), ("http", args.http), ("switch interval", args.switch_interval)]
    command += ["--loop", args.loop, "--http", args.http, "--switch-interval", str(args.switch_interval)]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server, timeout=900)
        messages = request_messages(build_qwen1_tokenizer(TOKENIZER))
        setup = f"{args.slots} slots x {args.slot_tokens} tokens, {args.check_every} steps a chunk, " \
            f"prefills of {args.prefill_tokens} tokens (graphs up to {args.graph_prefill_tokens})" + \
            (", compiled step" if args.compile_decode else "") + \
            (f", LLM {args.quantize}" if args.quantize else "") + \
            (f", {args.admission_steps} steps after an admission" if args.admission_steps != "0" else "") + \
            (f", HTTP front ends in {args.frontend_processes} processes" if args.frontend_processes else "") + \
            "".join(f", {name} {value}" for name, value in server_options if value not in ("auto", 0.0))
        print(f"\n| serve, {setup}, streaming | clients | tokens/s | TTFT p50 ms | TTFT p95 ms | "
              "server p50 from arrival: submitted / first text, ms | "
              "in the scheduler: p50 to a slot / to the first token, ms | errors | peak GiB | "
              "loop waiting for the GPU |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for clients in (int(c) for c in args.clients.split(",")):
            run_clients(f"{url}/v1", clients, 1, messages, args.new_tokens, args.client_processes)  # warm-up
            if not args.frontend_processes:
                _get(f"{url}/bench/counters?reset=true")
            if args.frontend_processes:
                time.sleep(0.6)  # the front ends' copy of the engine's stats is up to 0.5 s old
            before = _get(f"{url}/health")
            row = run_clients(f"{url}/v1", clients, args.requests_per_client, messages, args.new_tokens,
                              args.client_processes)
            if args.frontend_processes:  # no /bench/counters in the front end: the engine's stats come with /health
                time.sleep(0.6)  # they are up to 0.5 s old
                counters = _engine_counters(_get(f"{url}/health"), row["start"], row["end"])
            else:
                counters = _get(f"{url}/bench/counters")
            peak = counters["peak_gib"]
            after = _get(f"{url}/health")
            rounds = after["round_s"] - before["round_s"]
            waiting = (after["device_wait_s"] - before["device_wait_s"]) / rounds if rounds > 0 else float("nan")
            print(f"| {row['requests']} requests, {args.new_tokens} new tokens each | {clients} | "
                  f"{row['tokens_per_s']:.0f} | {row['ttft_p50']:.0f} | {row['ttft_p95']:.0f} | "
                  f"{_ms(counters['intake_ms'])} / {_ms(counters['first_text_ms'])} | "
                  f"{_ms(counters['slot_wait_ms'])} / {_ms(counters['first_token_ms'])} | {row['errors']} | "
                  f"{'-' if peak is None else f'{peak:.1f}'} | {waiting:.0%} of {rounds:.1f} s |", flush=True)
    finally:
        server.terminate()
        server.wait(60)


def baseline_row(args: argparse.Namespace) -> None:
    """transformers' static-cache `generate` on one batch of `--baseline-batch` (63-token prompts, one image)."""
    from benchmarks.bench import EXTRA_0, PROMPT_GEN

    model, _ = model_and_tokenizer(args.size, args.device)
    batch, n = args.baseline_batch, args.new_tokens
    ids = torch.randint(0, 150000, (batch, PROMPT_GEN), generator=torch.Generator().manual_seed(0))
    ids[:, 5:37] = EXTRA_0
    ids = ids.to(args.device)
    px = torch.randn(batch, 3, 224, 224, device=args.device, dtype=model.part_dtype("vision_model"))
    kwargs = dict(do_sample=False, pad_token_id=151643, eos_token_id=None, cache_implementation="static")

    def timed(count: int) -> float:
        sync(args.device)
        start = time.perf_counter()
        model.generate(ids, pixel_values=px, max_new_tokens=count, min_new_tokens=count, **kwargs)
        sync(args.device)
        return time.perf_counter() - start

    reset_peak(args.device)
    timed(n)  # warm-up
    first, full = min(timed(1) for _ in range(2)), timed(n)
    print(f"| transformers static-cache generate, one batch | {batch} | {batch * n / full:.0f} "
          f"(decode {batch * (n - 1) / (full - first):.0f}) | {first * 1000:.0f} | | | | | "
          f"{peak_gib(args.device):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_options(parser)
    parser.add_argument("--frontend-processes", type=int, default=0,
                        help="the HTTP server in N processes of their own (serve --frontend-processes N)")
    parser.add_argument("--client-processes", type=int, default=8,
                        help="processes the clients are spread over (1: all on one asyncio loop, as before)")
    parser.add_argument("--baseline-batch", type=int, default=32, help="0: no baseline row")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="uvicorn's event loop")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"], help="uvicorn's HTTP parser")
    parser.add_argument("--role", choices=["driver", "server"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.admission_steps.isdigit():
        parser.error("serve_load takes one --admission-steps value (scheduler_load takes a list)")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.role == "server":
        set_admission_steps(int(args.admission_steps))
        run_server(args)
        return
    print(f"# serve under load, MiniGPT4Qwen-{args.size} random weights | {machine()}")
    print(f"# python -m benchmarks.serve_load {' '.join(sys.argv[1:])}")
    server_rows(args)
    if args.baseline_batch:
        baseline_row(args)


if __name__ == "__main__":
    main()
