"""Training and generation throughput of MiniGPT4Qwen at full size (random weights), printed as tables.

    python -m benchmarks.bench --size 7b --compile --engine both   # one GPU: the whole table, ours and plain
    python -m benchmarks.bench --size tiny --device cpu --steps 2     # a dry run of the script itself
    python -m benchmarks.bench --size 7b --compile --float8 --skip-generation --cap-every ""  # bf16, then float8

Training workload: one 224x224 image + 209 real tokens per sample (32 placeholders, a ~57-token prompt, a
120-token supervised answer), no padding; only the projection trains; bf16 towers, fp32 projection, bf16 autocast.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time

import torch

from benchmarks.common import (
    EXTRA_0,
    build_random_model,
    build_random_plain,
    machine,
    peak_gib,
    reset_peak,
    sync,
    timed_training,
)
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.model.activation_checkpointing import apply_activation_checkpointing
from minigpt4qwen.model.compilation import compile_blocks
from minigpt4qwen.model.float8 import apply_float8
from minigpt4qwen.model.float8_weights import store_float8_weights
from minigpt4qwen.model.fused_projections import fuse_projections
from minigpt4qwen.model.parts import PartDtypes, TrainableParts

SEQ, ANSWER, PROMPT_GEN = 209, 120, 63
SECTIONS = ("ours", "float8", "plain")
TRAIN_TFLOP_PER_SAMPLE_7B = 6.5  # anchors.md: ViT + Q-Former + LLM fwd + LLM bwd-to-inputs at 209 tokens
MATMUL_CEILING_TFLOPS = 790.0


def training_batch(batch: int, device: str, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 150000, (batch, SEQ), generator=g)
    ids[:, 5:37] = EXTRA_0  # one image's placeholder run after the system/user header
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(batch, 3, 224, 224, generator=g).to(device)}


def bench_training(model, device: str, batch: int, steps: int, warmup: int, plain: bool = False) -> tuple[float, float]:
    """Returns (samples/s, peak GiB) for projection-only training at `batch` samples per step."""
    data = training_batch(batch, device, model.config.text_config.vocab_size)
    if plain:  # transformers' own forward: full logits, its loss
        data["pixel_values"] = data["pixel_values"].to(torch.bfloat16)
    seconds, peak = timed_training(model, [data] * (warmup + steps), warmup, device)
    return batch / seconds, peak


def bench_generation(model, device: str, batch: int, new_tokens: int, cache: str | None) -> tuple[float, float, float]:
    """Returns (time to first token in ms, decode tokens/s aggregated over the batch, peak GiB: weights, cache,
    graphs and activations), greedy, forced length.

    `cache` is transformers' cache implementation (None = dynamic, "static"), or "ours" / "ours-compiled" /
    "ours-autotuned" for the `GraphDecoder` (static cache, CUDA graphs for encoder, prefill and decode
    step, decode step eager / compiled / compiled with tuned matmuls; batch 1 only). `generation_rows` strips a
    "-fused" suffix after fusing the LLM's projections.
    """
    gc.collect()  # the previous row's decoder and caches
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    reset_peak(device)
    ids = torch.randint(0, 150000, (batch, PROMPT_GEN), generator=torch.Generator().manual_seed(0))
    ids[:, 5:37] = EXTRA_0
    ids = ids.to(device)
    px = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)
    kwargs = dict(do_sample=False, pad_token_id=151643, eos_token_id=None)
    ours = cache is not None and cache.startswith("ours")
    if ours:
        modes = {"ours": None, "ours-compiled": "default", "ours-autotuned": "max-autotune-no-cudagraphs",
                 "ours-compiled-sampling": "default"}
        decoder = GraphDecoder(model, max_cache_len=PROMPT_GEN + new_tokens, compile_mode=modes[cache])
        sampling = {"do_sample": True, "top_p": 0.8, "top_k": 50} if cache.endswith("sampling") else {}
    elif cache:
        kwargs["cache_implementation"] = cache

    def timed(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        if ours:
            decoder.generate(ids, pixel_values=px, max_new_tokens=n, **sampling)
        else:
            model.generate(ids, pixel_values=px, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up (and compilation for the static cache)
        timed(new_tokens)
    first = min(timed(1) for _ in range(3))
    full = min(timed(new_tokens) for _ in range(2))
    return first * 1000, batch * (new_tokens - 1) / (full - first), peak_gib(device)


def cap_rows(model, args: argparse.Namespace, engine: str = "") -> None:
    """Training under a memory cap, with every k-th LLM block checkpointed (k from --cap-every; 0: none first, then
    descending k), at each micro-batch of --cap-batches."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    for every in sorted((int(k) for k in args.cap_every.split(",")), key=lambda k: (k != 0, -k)):
        # Wrapping is additive: going from every=2 to every=1 wraps the remaining blocks.
        if every:
            apply_activation_checkpointing(model, vision=False, language_model=True, every=every)
        for batch in (int(b) for b in args.cap_batches.split(",")):
            kept = f"checkpoint 1/{every} of LLM blocks" if every else "no checkpointing"
            name = f"{engine}{args.cap_gib:.0f} GiB cap, {kept}"
            try:
                sps, peak = bench_training(model, args.device, batch, args.steps, warmup=2)
                print(f"| {name} | {batch} | {sps:.1f} | {sps * SEQ:.0f} | | | {peak:.1f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {name} | {batch} | OOM | | | | |", flush=True)
                reset_peak(args.device)
    torch.cuda.set_per_process_memory_fraction(1.0)


def training_rows(model, args: argparse.Namespace, engine: str) -> None:
    """Prints the max-throughput training rows of `model` (checkpointing off, each micro-batch of --batches)."""
    name = f"{engine}, checkpointing off"
    for batch in (int(b) for b in args.batches.split(",") if b):
        try:
            sps, peak = bench_training(model, args.device, batch, args.steps, warmup=3, plain=engine == "plain")
        except torch.OutOfMemoryError:
            print(f"| {name} | {batch} | OOM | | | | |")
            reset_peak(args.device)
            continue
        tflops = sps * TRAIN_TFLOP_PER_SAMPLE_7B * (2.0 if args.size == "14b" else 1.0)
        print(f"| {name} | {batch} | {sps:.1f} | {sps * SEQ:.0f} | {tflops:.0f} | "
              f"{tflops / MATMUL_CEILING_TFLOPS:.0%} | {peak:.1f} |", flush=True)


def generation_rows(model, args: argparse.Namespace) -> None:
    """Prints one generation row per --caches entry and batch size."""
    print("\n| generation (greedy, 63-token prompt with one image, 128 new tokens) | batch | TTFT ms | decode tok/s "
          "| peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    # Fusing is in place and stays: the "-fused" rows run after the others.
    for row in sorted(args.caches.split(","), key=lambda name: name.endswith("-fused")):
        if row.endswith("-fused"):
            fuse_projections(model.language_model)
        cache = row.removesuffix("-fused")
        cache = None if cache == "dynamic" else cache
        for batch in ((1,) if cache and cache.startswith("ours") else (1, 8, 32)):
            try:
                ttft, tps, peak = bench_generation(model, args.device, batch, 128 if args.size != "tiny" else 8, cache)
                print(f"| {row} cache | {batch} | {ttft:.0f} | {tps:.1f} | {peak:.1f} |", flush=True)
            except Exception as err:  # a benchmark row failing must not hide the others
                print(f"| {row} cache | {batch} | failed: {type(err).__name__}: {str(err)[:80]} | |", flush=True)


def build_plain(args: argparse.Namespace):
    """Plain transformers' `Blip2ForConditionalGeneration`, projection trainable."""
    model = build_random_plain(args.size, args.device)
    model.requires_grad_(False)
    model.language_projection.requires_grad_(True)
    return model.train()


def build_ours(args: argparse.Namespace, float8: bool = False):
    """Our model, projection trainable; with `float8` its LLM blocks' matmuls in float8 (`model.float8`, converted
    before compiling, as training does; the CPU dry run takes torch's CPU fp8 matmul), and with `--float8-weights`
    its frozen weights stored in float8 (`model.float8_weights`)."""
    model = build_random_model(args.size, args.device, PartDtypes("bf16", "bf16", "bf16", "fp32", "bf16"))
    model.set_trainable(TrainableParts())
    if float8:
        apply_float8(model, allow_cpu=args.device == "cpu")
        if getattr(args, "float8_weights", False):  # the frozen weights cast once, stored in float8
            store_float8_weights(model.language_model)
    if args.compile:
        compile_blocks(model)
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,4,16,32", help="training micro-batch sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="memory cap for the 'consumer card' rows")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--engine", default="ours", choices=["ours", "plain", "both"],
                        help="plain = transformers' Blip2ForConditionalGeneration, the anchors' baseline; both = "
                             "ours, then plain's training rows in the same call (each table in a process of its own)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each ViT and LLM block")
    parser.add_argument("--float8", action="store_true", help="then the training rows again on a model (in a process "
                        "of its own) with the LLM blocks' matmuls in float8 (model.float8: sm_89+, torchao)")
    parser.add_argument("--float8-weights", action="store_true", help="with --float8: the float8 rows' frozen LLM "
                        "weights stored in float8 (model.float8_weights: half their memory)")
    parser.add_argument("--caches", default="dynamic,static,ours-compiled",
                        help="generation rows: dynamic, static (transformers), ours, ours-compiled, ours-autotuned, "
                             "ours-compiled-sampling (top-p 0.8, top-k 50); any with -fused: q/k/v and gate/up "
                             "fused first (fuse_projections; those rows run last)")
    parser.add_argument("--compile-vision", action="store_true", help="compile the ViT blocks for generation (TTFT)")
    parser.add_argument("--cap-every", default="1,2", help="activation-checkpoint every k-th LLM block under the cap "
                        "(0: none)")
    parser.add_argument("--cap-batches", default="4,8,16", help="micro-batch sizes under the cap")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child process's one table
    args = parser.parse_args()
    if args.section is None:
        compiled = " + compile" if args.compile else ""
        print(f"# MiniGPT4Qwen-{args.size} benchmark, engine {args.engine}{compiled} | {machine()}", flush=True)
        # One process per table: a model built after another in the same process trained up to 10% slower (one
        # H100: 14B float8 59.9 samples/s after the bf16 rows, 64.2 alone), which would bias the comparison.
        for section in sections(args):
            subprocess.run([sys.executable, "-m", "benchmarks.bench", *sys.argv[1:], "--section", section],
                           check=True)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    # The cap rows change micro-batches and checkpoint wrappers under compiled blocks: more variants than dynamo's
    # default 8 per block, past which a block would run eagerly and the row measure that instead.
    torch._dynamo.config.recompile_limit = 64
    print(f"\n| training (projection only){'' if args.section == 'ours' else ', same call'} | micro-batch | samples/s "
          "| tokens/s | TFLOP/s | of ceiling | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    if args.section == "plain":
        training_rows(build_plain(args), args, "plain")
        return
    # float8: a model of its own, its float8 blocks compiled afresh.
    model = build_ours(args, float8=args.section == "float8")
    training_rows(model, args, "ours" if args.section == "ours" else "ours + float8 LLM blocks")
    if args.device.startswith("cuda") and args.cap_every:
        cap_rows(model, args, "" if args.section == "ours" else "float8 LLM blocks, ")
    if args.section == "ours" and not args.skip_generation:
        model.eval()
        if args.compile_vision:
            compile_blocks(model, vision=True, language_model=False)
        generation_rows(model, args)


def sections(args: argparse.Namespace) -> list[str]:
    """The tables a run prints, each from its own process: ours, then float8 and plain as asked."""
    if args.engine == "plain":
        return ["plain"]
    return ["ours"] + (["float8"] if args.float8 else []) + (["plain"] if args.engine == "both" else [])


if __name__ == "__main__":
    main()
