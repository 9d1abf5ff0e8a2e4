"""The server role of `benchmarks/serve_load.py`: what `minigpt4qwen serve` runs on a random-weight model, plus
`/bench/counters` (peak GPU memory and where a request's wait for its first text goes on the server).

The arrival stamp is taken when uvicorn starts a request's ASGI task, after its headers are parsed: event-loop
delay before that counts as the client's, so the server-side intake times are lower bounds. The timing wrapper
around `GenerationHandle.__aiter__` adds one async-generator layer per text piece (microseconds).
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import io
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import build_random_model, peak_gib, reset_peak
from minigpt4qwen.inference.decoding import slot_rounds
from minigpt4qwen.model.parts import PartDtypes

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "qwen7b" / "qwen.tiktoken"
DTYPES = PartDtypes("bf16", "bf16", "bf16", "fp32", "bf16")


PROMPT_TOKENS = 63


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """The options serve_load and scheduler_load share: model size, load, and the scheduler's settings."""
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", default="1,32,64", help="concurrent clients of each row")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--slot-tokens", type=int, default=256, help="prompt + reply tokens per slot")
    parser.add_argument("--check-every", type=int, default=8, help="decode steps per chunk (read back together)")
    parser.add_argument("--prefill-tokens", type=int, default=2048,
                        help="the most padded tokens of one prefill forward (the scheduler's prefill_tokens)")
    parser.add_argument("--graph-prefill-tokens", type=int, default=512,
                        help="prefill forwards up to this many padded tokens replay CUDA graphs")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the LLM quantized (torchao), as serve does")
    parser.add_argument("--quantize-kernels", default="torchao", choices=["torchao", "gemlite"],
                        help="what computes the quantized layers, as serve's --quantize-kernels")
    parser.add_argument("--compile-decode", action="store_true", help="the decode step compiled")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="the model process's sys.setswitchinterval in seconds (0: Python's default, 5 ms)")
    parser.add_argument("--admission-steps", default="0", help="decode steps queued by a round that admits "
                        "newcomers (slot_rounds.ADMISSION_STEPS; 0: the scheduler's own; --check-every: no shorter "
                        "chunk, as before the ADMISSION_STEPS rule); scheduler_load takes a list, a row set each")


def question_text(tokenizer, target: int) -> str:
    """A question whose ChatML prompt (default system prompt, one image of 32 placeholders) has `target` tokens."""
    from minigpt4qwen.inference.engine import IMAGE_PROMPT
    from minigpt4qwen.text.conversation import render_chatml

    def length(text: str) -> int:
        messages = [{"role": "user", "content": IMAGE_PROMPT + text}]
        return len(render_chatml(tokenizer, messages, image_token_id=151646, num_query_tokens=32,
                                 add_generation_prompt=True).input_ids)

    words = "Describe the picture".split()
    while length(" ".join(words)) < target:
        words.append("please")
    return " ".join(words)


def request_messages(tokenizer) -> list[dict]:
    """Every request's messages: one 224px noise PNG (as a data URL) and a question of a 63-token prompt."""
    from PIL import Image

    image = io.BytesIO()
    Image.effect_noise((224, 224), 64).convert("RGB").save(image, "PNG")
    uri = f"data:image/png;base64,{base64.b64encode(image.getvalue()).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": question_text(tokenizer, PROMPT_TOKENS)}]}]


def set_admission_steps(steps: int, default: int = slot_rounds.ADMISSION_STEPS) -> None:
    """This benchmark process's scheduler queues `steps` decode steps after an admission (0: its own default)."""
    slot_rounds.ADMISSION_STEPS = steps or default


def build_scheduler(args: argparse.Namespace):
    """The model, tokenizer and scheduler `serve` would run on the random-weight model (quantized as `serve
    --quantize` loads it, projections fused as `load_for_inference` does), no stop tokens."""
    from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
    from minigpt4qwen.model.fused_projections import fuse_projections

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    model, tokenizer = model_and_tokenizer(args.size, args.device)
    model.requires_grad_(False)
    if args.quantize:
        from minigpt4qwen.model.quantization import quantize_language_model

        quantize_language_model(model, args.quantize)
    fuse_projections(model.language_model)
    if args.quantize and args.quantize_kernels == "gemlite":
        from minigpt4qwen.model.gemlite_layers import route_through_gemlite

        route_through_gemlite(model.language_model)
    scheduler = GenerationScheduler(model, tokenizer, slots=args.slots, capacity=args.slot_tokens, stop_token_ids=(),
                                    check_every=args.check_every, prefill_tokens=args.prefill_tokens,
                                    graph_prefill_tokens=args.graph_prefill_tokens,
                                    compile_mode="default" if args.compile_decode else None)
    scheduler.warm_up(show_progress=True)  # as `serve` does before its first request
    return model, tokenizer, scheduler


def model_and_tokenizer(size: str, device: str):
    """A random-weight model of `size` on `device` (bf16 on a GPU, fp32 on the CPU) and the Qwen tokenizer."""
    from minigpt4qwen.text.qwen_tokenizer import build_qwen1_tokenizer

    dtypes = DTYPES if device.startswith("cuda") else PartDtypes.uniform("fp32")
    return build_random_model(size, device, dtypes).eval(), build_qwen1_tokenizer(TOKENIZER)


class _ArrivalStamp:
    """ASGI wrapper noting when each HTTP request reached the server (in a context variable the handler sees)."""

    def __init__(self, app, arrival: contextvars.ContextVar):
        self.app, self.arrival = app, arrival

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.arrival.set(time.perf_counter())
        await self.app(scope, receive, send)


def run_server(args: argparse.Namespace) -> None:
    """The server role: what `minigpt4qwen serve` runs, plus /bench/counters (peak GPU memory and where a request's
    wait for its first text goes on the server, reset on request)."""
    import uvicorn

    from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
    from minigpt4qwen.inference.frontends.openai_api.server import build_app

    model, tokenizer, scheduler = build_scheduler(args)
    if args.frontend_processes:
        run_split(args, model, tokenizer, scheduler)
        return
    app = build_app(model, tokenizer, "bench", scheduler=scheduler, max_queue=4 * args.slots)

    # Per request, milliseconds from its arrival to its submission to the scheduler (reading, parsing, image
    # decoding, tokenizing) and to its first text piece leaving the handle for the HTTP stream.
    arrival: contextvars.ContextVar[float] = contextvars.ContextVar("arrival")
    intake_ms, first_text_ms = [], []
    submit = scheduler.submit

    def timed_submit(*submit_args, **kwargs):
        arrived = arrival.get(None)  # None: not submitted by an HTTP request
        handle = submit(*submit_args, **kwargs)
        handle.bench_arrival = arrived
        if arrived is not None:
            intake_ms.append(1000 * (time.perf_counter() - arrived))
        return handle

    pieces = GenerationHandle.__aiter__

    async def timed_pieces(handle):
        first = True
        async for piece in pieces(handle):
            arrived = getattr(handle, "bench_arrival", None)
            if first and arrived is not None:
                first_text_ms.append(1000 * (time.perf_counter() - arrived))
            first = False
            yield piece

    scheduler.submit, GenerationHandle.__aiter__ = timed_submit, timed_pieces

    @app.get("/bench/counters")
    async def counters(reset: bool = False) -> dict[str, float | None]:
        """Peak GPU memory, the scheduler's median milliseconds from submission to a slot and to the first token,
        and the server's from arrival to submission and to the first text piece."""
        peak = peak_gib(args.device) if args.device.startswith("cuda") else None
        latencies = list(scheduler.rounds.latencies)
        medians = {"slot_wait_ms": [1000 * w for _, w, _ in latencies],
                   "first_token_ms": [1000 * f for _, _, f in latencies],
                   "intake_ms": list(intake_ms), "first_text_ms": list(first_text_ms)}
        if reset:
            reset_peak(args.device)
            scheduler.rounds.latencies.clear()
            intake_ms.clear()
            first_text_ms.clear()
        return {"peak_gib": peak, **{k: statistics.median(v) if v else None for k, v in medians.items()}}

    uvicorn.run(_ArrivalStamp(app, arrival), host="127.0.0.1", port=args.port, log_level="warning",
                loop=args.loop, http=args.http)


def run_split(args: argparse.Namespace, model, tokenizer, scheduler) -> None:
    """`serve --frontend-processes N`: the engine's stats (forwarded to the front end's /health) also carry every
    recent request's (monotonic time of its first token, seconds to a slot, seconds to the first token) and the
    peak GPU memory (not reset between rows), for the driver's scheduler columns. Pickling up to 4,096 of these
    every 0.5 s per front end costs the engine's process about a millisecond each time."""
    from minigpt4qwen.inference.frontends.openai_api.frontend_process import FrontendOptions, FrontendProcesses

    stats = scheduler.stats

    def bench_stats():
        peak = peak_gib(args.device) if args.device.startswith("cuda") else None
        return {**stats(), "bench_latencies": list(scheduler.rounds.latencies), "bench_peak_gib": peak}

    scheduler.stats = bench_stats
    frontends = FrontendProcesses(model, tokenizer, scheduler, FrontendOptions(
        port=args.port, model_name="bench", app_options={"max_queue": 4 * args.slots}, log_level="warning"),
        args.frontend_processes)
    frontends.start()
    frontends.run()
