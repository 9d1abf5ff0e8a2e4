"""Where a projection-only training step spends its GPU time: the image towers against the whole step, and the
step's kernels grouped by kind (fp8 / bf16 GEMMs, attention, inductor's fused kernels, the rest).

    python -m benchmarks.train_profile --size 7b --batch 64 [--float8 [--float8-weights]] [--no-compile]
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import build_ours, training_batch
from benchmarks.common import machine, seconds_per_call, sync

KINDS = (  # first match wins: kernel names of cuBLAS / cuDNN / flash / torchao / inductor on Hopper
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("fp8 GEMM", re.compile(r"e4m3|e5m2|fp8|f8f8|nvjet_sm90_q[qr]", re.I)),  # nvjet_sm90_qq / _qr: fp8 operands
    ("bf16 GEMM", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90_", re.I)),
    ("inductor fused", re.compile(r"^triton_")),
    ("copies / casts", re.compile(r"copy|cast|convert|elementwise|vectorized", re.I)),
)


def kind_of(kernel: str) -> str:
    """The kind of a kernel, by its name (`KINDS`)."""
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--float8", action="store_true", help="the LLM blocks' matmuls in float8 (model.float8)")
    parser.add_argument("--float8-weights", action="store_true", help="with --float8: frozen weights stored in float8")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    model = build_ours(args, float8=args.float8)
    data = training_batch(args.batch, dev, model.config.text_config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
            loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def towers() -> None:
        with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
            model.encode_images(data["pixel_values"])

    for _ in range(2):
        step()
    step_s = seconds_per_call(step, dev, args.steps)
    towers_s = seconds_per_call(towers, dev, args.steps)
    stored = " (weights stored in float8)" if args.float8 and args.float8_weights else ""
    print(f"# training step profile, MiniGPT4Qwen-{args.size}, micro-batch {args.batch}, "
          f"{'float8' if args.float8 else 'bf16'} LLM blocks{stored}, {'compiled' if args.compile else 'eager'} "
          f"| {machine()}")
    print(f"step {step_s * 1000:.1f} ms ({args.batch / step_s:.1f} samples/s); ViT + Q-Former + projection forward "
          f"{towers_s * 1000:.1f} ms ({towers_s / step_s:.0%} of the step)")
    activity = ProfilerActivity.CUDA if dev.startswith("cuda") else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(args.steps):
            step()
        sync(dev)
    device_type = torch.autograd.DeviceType.CUDA if dev.startswith("cuda") else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == device_type]

    def per_step_ms(event) -> float:
        total = event.self_device_time_total if dev.startswith("cuda") else event.self_cpu_time_total
        return total / args.steps / 1000

    by_kind: dict[str, float] = {}
    for event in events:
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + per_step_ms(event)
    busy = sum(by_kind.values())
    print(f"kernel time {busy:.1f} ms per step ({busy / 1000 / step_s:.0%} of the wall time); by kind:")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {ms:7.1f} ms  {ms / busy:4.0%}  {kind}")
    print("top kernels per step:")
    for event in sorted(events, key=lambda e: -per_step_ms(e))[:25]:
        print(f"  {per_step_ms(event):7.2f} ms  x{event.count // args.steps:<5} [{kind_of(event.key)}] "
              f"{event.key[:100]}")


if __name__ == "__main__":
    main()
