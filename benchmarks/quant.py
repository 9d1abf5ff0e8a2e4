"""Quantized LLM weights (torchao int8 / int4) beside bf16: chat memory, first token and decode speed, projection-only
training, all under a memory cap; next-token agreement with bf16; host and GPU memory while a model streams in.

    python -m benchmarks.quant --size 7b                      # one GPU: chat rows (24 GiB cap) and quality rows
    python -m benchmarks.quant --size 14b --train --compile-decode
    python -m benchmarks.quant --size 7b --loading --work-dir /tmp/q   # writes a random Qwen1 directory, loads it
    python -m benchmarks.quant --size tiny --device cpu --train --loading   # a dry run on the CPU

Models are full size with random weights (`benchmarks/common.py`'s configs and init), materialised one block at a
time on the device and quantized as each block appears, so under the cap the bf16 model never exists whole. Random
weights make the quality rows a weak proxy: without the outlier channels of trained weights, rounding errors are
spread evenly, and the agreement of near-uniform random next-token distributions says little about answers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn

from benchmarks.bench import EXTRA_0, PROMPT_GEN, bench_generation, bench_training
from benchmarks.common import CONFIGS, benchmark_config, fill_random, machine, peak_gib, reset_peak, sync
from minigpt4qwen.model.activation_checkpointing import apply_activation_checkpointing
from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.fused_projections import fuse_projections
from minigpt4qwen.model.gemlite_layers import route_through_gemlite
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.parts import PartDtypes, TrainableParts
from minigpt4qwen.model.quantization import quantize_language_model, quantize_llm_weights

MODES = ("bf16", "int8", "int4")
DTYPES = PartDtypes("bf16", "bf16", "bf16", "fp32", "bf16")
# Qwen1 config.json overrides of the tiny CPU dry run's directory: big enough for the layers to dominate.
TINY_QWEN1 = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8, "kv_channels": 128,
              "intermediate_size": 5632, "vocab_size": 8192}


def model_config(size: str):
    """The composite config; tiny is 128 wide so that int4's groups of 128 apply."""
    if size != "tiny":
        return benchmark_config(size)
    config = minigpt4qwen_config(tiny_qwen2_config(vocab_size=151936, hidden_size=128), image_token_id=EXTRA_0,
                                 vision_config=tiny_vision_config(224), qformer_config=tiny_qformer_config(),
                                 num_query_tokens=32)
    config.text_config._attn_implementation = "sdpa"
    return config


def build(size: str, device: str, mode: str) -> MiniGPT4Qwen:
    """The random model, only the projection trainable, its LLM quantized block by block as it is materialised."""
    with init_empty_weights(include_buffers=False):
        model = MiniGPT4Qwen(model_config(size))
    model.cast_parts(DTYPES)
    model.set_trainable(TrainableParts())
    generator = torch.Generator(device=device).manual_seed(0)
    llm = model.language_model
    for part in (model.vision_model, model.qformer, model.language_projection, llm.get_input_embeddings(),
                 *llm.model.layers, llm):
        fill_random(part, device, generator)
        if mode != "bf16":
            quantize_llm_weights(llm, mode)
    fill_random(model, device, generator)  # the query tokens
    if mode != "bf16":
        quantize_language_model(model, mode)
    return model.to(device)


def set_cap(device: str, cap_gib: float | None) -> None:
    """Caps this process's CUDA allocations at `cap_gib` (None: the whole card)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * 2**30 / total))


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def chat_rows(args: argparse.Namespace) -> None:
    """Weights after loading, first token and batch-1 greedy decode speed per mode, under the cap."""
    cache = ("ours-compiled" if args.compile_decode else "ours") if args.device.startswith("cuda") else None
    print(f"\n| chat, {args.cap_gib:g} GiB cap ({cache or 'transformers dynamic'} cache, greedy, {PROMPT_GEN}-token "
          f"prompt + image, {args.new_tokens} new) | loaded GiB | load peak GiB | first token ms | decode tok/s "
          "| chat peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    set_cap(args.device, args.cap_gib)
    for mode in args.modes.split(","):
        try:
            reset_peak(args.device)
            quantization, _, kernels = mode.partition("+")
            model = build(args.size, args.device, quantization).eval()
            if args.fused:  # as `load_for_inference` loads for chat and serve
                fuse_projections(model.requires_grad_(False).language_model)
            if kernels == "gemlite":  # after fusing, as `load_for_inference` does
                route_through_gemlite(model.language_model)
            elif kernels:
                raise ValueError(f"unknown kernels {kernels!r} (int8+gemlite, int4+gemlite)")
            loaded = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            load_peak = peak_gib(args.device)
            with torch.no_grad():
                ttft, tps, peak = bench_generation(model, args.device, 1, args.new_tokens, cache)
            print(f"| {mode} | {loaded:.1f} | {load_peak:.1f} | {ttft:.1f} | {tps:.1f} | {peak:.1f} |", flush=True)
        except torch.OutOfMemoryError:
            print(f"| {mode} | OOM under the cap | | | | |", flush=True)
        except Exception as err:  # one failing row must not hide the others
            print(f"| {mode} | failed: {type(err).__name__}: {str(err)[:100]} | | | | |", flush=True)
        model = None
        free(args.device)
    set_cap(args.device, None)


def train_rows(args: argparse.Namespace) -> None:
    """Projection-only training per mode (int4 has no backward) under the cap, LLM blocks checkpointed."""
    print(f"\n| projection-only training, {args.cap_gib:g} GiB cap, LLM checkpointing 1/{args.checkpoint_every} "
          "| micro-batch | samples/s | peak GiB |")
    print("| --- | --- | --- | --- |")
    set_cap(args.device, args.cap_gib)
    for mode in (m for m in args.modes.split(",") if m != "int4"):
        try:
            model = build(args.size, args.device, mode).train()
            if args.checkpoint_every:
                apply_activation_checkpointing(model, vision=False, language_model=True, every=args.checkpoint_every)
        except torch.OutOfMemoryError:
            print(f"| {mode} | | OOM loading under the cap | |", flush=True)
            model = None
            free(args.device)
            continue
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                sps, peak = bench_training(model, args.device, batch, args.steps, warmup=2)
                print(f"| {mode} | {batch} | {sps:.1f} | {peak:.1f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {mode} | {batch} | OOM | |", flush=True)
            free(args.device)
        model = None
        free(args.device)
    set_cap(args.device, None)


@torch.no_grad()
def quality_rows(args: argparse.Namespace) -> None:
    """Next-token KL(bf16 || quantized) and top-1 agreement over every position of a few prompts, the quantized
    model being the bf16 one quantized in place (no cap: bf16 14B does not fit 24 GiB)."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (args.prompts, PROMPT_GEN), generator=generator)
    prompts[:, 5:37] = EXTRA_0
    pixels = torch.randn(args.prompts, 3, 224, 224, generator=generator, dtype=torch.bfloat16)

    def log_probs(model: MiniGPT4Qwen) -> list[torch.Tensor]:
        return [model(prompts[i: i + 1].to(args.device), pixel_values=pixels[i: i + 1].to(args.device))
                .logits[0].float().log_softmax(-1).cpu() for i in range(args.prompts)]

    print(f"\n| next token vs bf16 ({args.prompts} prompts x {PROMPT_GEN} positions, random weights: a weak proxy) "
          "| KL(bf16 \\|\\| q) mean | KL max | top-1 agreement |")
    print("| --- | --- | --- | --- |")
    reference = None
    for mode in (m for m in args.modes.split(",") if m != "bf16"):
        model = build(args.size, args.device, "bf16").eval()
        reference = reference or log_probs(model)
        got = log_probs(quantize_language_model(model, mode, device=args.device))
        kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(reference, got, strict=True)])
        agree = torch.cat([r.argmax(-1) == q.argmax(-1) for r, q in zip(reference, got, strict=True)]).float()
        print(f"| {mode} | {kl.mean():.2e} | {kl.max():.2e} | {agree.mean():.1%} |", flush=True)
        model = None
        free(args.device)


def write_random_qwen1(size: str, directory: Path, layers_per_shard: int = 4) -> Path:
    """A Qwen1 directory (config.json + bf16 safetensors shards + index) with random weights, written shard by
    shard (never the whole model in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        config = json.loads((CONFIGS / "qwen7b_chat.json").read_text()) | TINY_QWEN1
    else:
        config = json.loads((CONFIGS / f"qwen{size}_chat.json").read_text())
    (directory / "config.json").write_text(json.dumps(config))
    h, v, n = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    f = config["intermediate_size"] // 2
    layer = {"ln_1.weight": (h,), "attn.c_attn.weight": (3 * h, h), "attn.c_attn.bias": (3 * h,),
             "attn.c_proj.weight": (h, h), "ln_2.weight": (h,), "mlp.w1.weight": (f, h), "mlp.w2.weight": (f, h),
             "mlp.c_proj.weight": (h, f)}
    groups = [{"transformer.wte.weight": (v, h)}]
    for start in range(0, n, layers_per_shard):
        groups.append({f"transformer.h.{i}.{k}": s for i in range(start, min(n, start + layers_per_shard))
                       for k, s in layer.items()})
    groups.append({"transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)})
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(s) if len(s) == 1 and "ln" in k else torch.randn(s, generator=generator) * 0.02)
                   .to(torch.bfloat16) for k, s in group.items()}
        save_file(tensors, directory / name)
        weight_map |= dict.fromkeys(tensors, name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last `reset_rss_peak`) of this process, in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load_one(directory: str, mode: str, device: str) -> None:
    """(In a fresh process) streams the LLM directory in `mode`; prints host RSS and GPU peaks as JSON."""
    from minigpt4qwen.checkpoint.qwen1 import load_qwen1_dir
    from minigpt4qwen.model.float8_weights import Float8WeightLinear

    float8 = mode == "float8_weights"
    # torchao's first use imports a few hundred MB of modules (inductor...): not the load's.
    if float8:
        from torchao.float8.float8_linear import Float8Linear

        Float8WeightLinear(Float8Linear.from_float(nn.Linear(128, 128, device=device).requires_grad_(False)))
    elif mode != "bf16":
        quantize_llm_weights(nn.Linear(128, 128, dtype=torch.bfloat16, device=device), mode)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak counts from here (imports excluded)
    baseline = rss_gib("VmRSS")
    start = time.perf_counter()
    llm = load_qwen1_dir(directory, dtype=torch.bfloat16, device=device, float8_weights=float8,
                         quantize=None if mode == "bf16" or float8 else mode)
    if mode not in ("bf16", "float8_weights"):
        quantize_llm_weights(llm, mode)  # the head, as build_model's final pass
    sync(device)
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - start, "rss_before_gib": baseline,
                      "rss_peak_gib": rss_gib("VmHWM"), "rss_after_gib": rss_gib("VmRSS"),
                      "gpu_peak_gib": peak_gib(device)}))


def loading_rows(args: argparse.Namespace) -> None:
    """Writes a random Qwen1 directory of the size, then loads it once per mode and allocator setting, each in a
    fresh process. glibc keeps freed heap blocks (its mmap threshold grows with use), so a load that frees each
    shard's bf16 copies can show a high RSS that is not live memory; MALLOC_MMAP_THRESHOLD_=65536 returns large
    blocks to the system at once and shows what the load holds."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="quant-bench-"))
    directory = work / f"qwen1-{args.size}-{args.layers_per_shard}"
    if not (directory / "model.safetensors.index.json").is_file():
        write_random_qwen1(args.size, directory, args.layers_per_shard)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**30
    print(f"\n| streamed load of {directory} ({size:.2f} GiB bf16 shards) | malloc | seconds | host RSS before GiB "
          "| host RSS peak GiB | host RSS after GiB | GPU peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        for malloc, env in (("glibc default", {}), ("mmap threshold 64 KiB", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
            run = subprocess.run([sys.executable, "-m", "benchmarks.quant", "--load-one", str(directory), "--modes",
                                  mode, "--device", args.device], capture_output=True, text=True,
                                 env={**os.environ, **env})
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode or not lines:
                print(f"| {mode} | {malloc} | failed: {run.stderr.strip().splitlines()[-1:]} | | | | |", flush=True)
                continue
            r = json.loads(lines[-1])
            print(f"| {mode} | {malloc} | {r['seconds']:.1f} | {r['rss_before_gib']:.2f} | {r['rss_peak_gib']:.2f} | "
                  f"{r['rss_after_gib']:.2f} | {r['gpu_peak_gib']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default=",".join(MODES), help="of bf16, int8, int4; int8+gemlite and int4+gemlite "
                        "(chat rows only): the quantized layers computed by gemlite's kernels; float8_weights "
                        "(--loading rows only): training's model.float8_weights, stored in float8 shard by shard")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile-decode", action="store_true", help="compile the CUDA-graph decoder's step")
    parser.add_argument("--train", action="store_true", help="add the projection-only training rows")
    parser.add_argument("--batches", default="4,8,16", help="training micro-batch sizes")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="0: no LLM activation checkpointing")
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the quality rows (0: none)")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--fused", action="store_true", help="chat rows with q/k/v and gate/up fused (quantized rows "
                        "stacked), as chat and serve load")
    parser.add_argument("--loading", action="store_true", help="add the streamed-loading rows (writes shards)")
    parser.add_argument("--work-dir", help="where --loading writes its random Qwen1 directory (kept for reuse)")
    parser.add_argument("--layers-per-shard", type=int, default=4,
                        help="--loading's shard size (4: ~1.6 GB at 7B, like the published 2 GB shards)")
    parser.add_argument("--load-one", help=argparse.SUPPRESS)  # the child process of --loading
    args = parser.parse_args()
    if args.load_one:
        load_one(args.load_one, args.modes, args.device)
        return
    if args.size == "tiny":
        args.new_tokens = min(args.new_tokens, 8)
    print(f"# quantized LLM, MiniGPT4Qwen-{args.size} | {machine()}")
    if not args.skip_chat:
        chat_rows(args)
    if args.train:
        train_rows(args)
    if args.prompts:
        quality_rows(args)
    if args.loading:
        loading_rows(args)


if __name__ == "__main__":
    main()
