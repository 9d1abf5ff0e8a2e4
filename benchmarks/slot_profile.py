"""Where the scheduler's batched decode step spends its GPU time: per batch size, the replayed step against the
weight-read bound, and the kernels of one step, grouped (the serving counterpart of decode_profile.py).

    python -m benchmarks.slot_profile --size 7b --batches 1,8,32,64 [--compile-mode default] [--spans 128,192,256]
    python -m benchmarks.slot_profile --size tiny --device cpu --batches 2,4     # a dry run

Each row fills `batch` slots with serve_load's prompt (63 tokens + one image's 32 placeholders) through the
`SlotDecoder` the scheduler drives, as a wave of newcomers is admitted (its image encoding and prefill forwards are
timed: the floor of their first tokens, issue 13's p50 <= 150 ms), then times chunks of `check_every` decode
steps replayed from their CUDA graphs, as the scheduler queues them (no host work between chunks). The profile runs
the same step eagerly, so its kernels are visible; its total leaves out launch gaps, which the graph removes.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import EXTRA_0, PROMPT_GEN
from benchmarks.common import build_random_model, machine, seconds_per_call, sync
from minigpt4qwen.inference.decoding.slot_decoder import Chunk, SlotDecoder, power_of_two
from minigpt4qwen.model.fused_projections import fuse_projections
from minigpt4qwen.model.parts import PartDtypes

CHUNKS = 6


def fill_slots(decoder: SlotDecoder, model, batch: int, device: str) -> int:
    """Prefills `batch` slots with one prompt each, as the scheduler admits a wave of `batch` newcomers (their
    images encoded in one batch, their prompts in forwards of up to 16), twice: the second wave (graphs captured
    by the first) is timed and printed, the floor of a wave's first tokens. Returns the longest position reached."""
    ids = torch.randint(0, 150000, (PROMPT_GEN,), generator=torch.Generator().manual_seed(0))
    ids[5:37] = EXTRA_0
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        sync(device)
        times = [time.perf_counter()]
        features = decoder.encode_images(pixels)[:1]
        sync(device)
        times.append(time.perf_counter())
        embeds = model.embed(ids[None].to(device), features)[0]
        for first in range(0, batch, 16):  # 16 prompts a forward: within the default prefill budget
            chunks = [Chunk(slot, embeds, 0, True) for slot in range(first, min(first + 16, batch))]
            for chunk in chunks:
                decoder.start(chunk.slot, sample=False, seed=0, temperature=1.0, top_p=1.0, top_k=0,
                              repetition_penalty=1.0)
            decoder.launch_prefill(chunks, sample=False).tolist()  # waits for its first tokens
            times.append(time.perf_counter())
    ms = [1000 * (b - a) for a, b in zip(times, times[1:])]
    print(f"\n## wave of {batch}: images encoded in {ms[0]:.1f} ms, then prefill forwards of up to 16 prompts "
          + ", ".join(f"{t:.1f}" for t in ms[1:]) + " ms (first tokens out after each)")
    return PROMPT_GEN


@torch.no_grad()
def profile_batch(decoder: SlotDecoder, model, batch: int, args: argparse.Namespace, streamed: float) -> None:
    longest = fill_slots(decoder, model, batch, args.device) + (CHUNKS + 2) * decoder.check_every
    steps = decoder.check_every
    decoder.launch_decode(steps, batch, longest, sample=False).tolist()  # captures this bucket's graph
    sync(args.device)
    start = time.perf_counter()
    for _ in range(CHUNKS):
        readback = decoder.launch_decode(steps, batch, longest, sample=False)
    readback.tolist()
    step_ms = (time.perf_counter() - start) / (CHUNKS * steps) * 1000
    print(f"## batch {batch}: {step_ms:.2f} ms per step (graph replay), {batch * 1000 / step_ms:.0f} tokens/s; "
          f"weights alone read in {streamed / args.bandwidth * 1000:.2f} ms at {args.bandwidth / 1e12:g} TB/s")
    cuda = args.device.startswith("cuda")
    bucket, span = power_of_two(batch), decoder.span_for(longest)  # as launch_decode picks them
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decoder._decode_step(bucket, span, False)  # the same step without the graph: kernels are visible
        sync(args.device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]

    def self_ms(e) -> float:
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps / 1000

    print(f"kernel time {sum(self_ms(e) for e in events):.2f} ms per step (eager, without launch gaps); top kernels:")
    for e in sorted(events, key=lambda e: -self_ms(e))[: args.top]:
        print(f"  {self_ms(e):6.3f} ms  x{e.count // steps:<4} {e.key[:110]}")
    if args.spans:  # last: these steps run past the rows' prompts (their state is refilled by the next batch)
        print("replayed step by attention span (columns every row reads): " + ", ".join(
            f"{span}: {time_span(decoder, bucket, span, args.device):.2f} ms" for span in args.spans))


def time_span(decoder: SlotDecoder, bucket: int, span: int, device: str, steps: int = 48) -> float:
    """Milliseconds per replay of the decode step over `bucket` rows reading `span` cache columns (spans the
    scheduler's power-of-two rule would not pick included: what a finer rule would save)."""
    key = ("decode", bucket, span, False)
    replay = decoder._graph(key, functools.partial(decoder._decode_step, *key[1:]))
    return seconds_per_call(replay, device, steps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8,32,64", help="decoding slots of each row")
    parser.add_argument("--slot-tokens", type=int, default=256, help="tokens per slot (serve_load's default)")
    parser.add_argument("--compile-mode", default="none", help="inductor mode of the decode step ('none': eager, "
                        "as serve runs without --compile-decode)")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s of the weight-read bound "
                        "(H100 SXM 3.35e12, H200 4.8e12)")
    parser.add_argument("--top", type=int, default=14, help="kernels listed per row")
    parser.add_argument("--spans", default="", help="also time the replayed step at these attention spans (e.g. "
                        "128,192,256; at most --slot-tokens): the cost of the keys and values read")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    args.spans = [int(s) for s in args.spans.split(",") if s]
    model = build_random_model(args.size, args.device, PartDtypes("bf16", "bf16", "bf16", "bf16", "bf16")).eval()
    fuse_projections(model.requires_grad_(False).language_model)  # as load_for_inference and serve_load do
    llm = model.language_model
    streamed = sum(p.numel() * p.element_size() for p in llm.parameters()) - llm.get_input_embeddings().weight.nbytes
    mode = None if args.compile_mode == "none" else args.compile_mode
    decoder = SlotDecoder(model, slots=max(batches), capacity=args.slot_tokens, compile_mode=mode)
    print(f"# batched decode step profile (SlotDecoder), MiniGPT4Qwen-{args.size}, projections fused, compile mode "
          f"{mode}, slots of {args.slot_tokens} tokens, {streamed / 1e9:.2f} GB of weights per step | {machine()}")
    for batch in batches:
        profile_batch(decoder, model, batch, args, streamed)


if __name__ == "__main__":
    main()
