"""Where a batch-1 decode step spends its GPU time: the kernels of one step, grouped, against the weight-read bound.

    python -m benchmarks.decode_profile --size 7b [--compile-mode default] [--fused]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import EXTRA_0, PROMPT_GEN
from benchmarks.common import build_random_model, machine, sync
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.model.fused_projections import fuse_projections
from minigpt4qwen.model.parts import PartDtypes

STEPS = 20


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-mode", default="default", help="inductor mode of the decode step; 'none' for eager")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="let SDPA pick another kernel")
    parser.add_argument("--fused", action="store_true", help="fuse q/k/v and gate/up (as load_for_inference does)")
    args = parser.parse_args()
    dev = args.device
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_random_model(args.size, dev, PartDtypes("bf16", "bf16", "bf16", "bf16", "bf16")).eval()
    if args.fused:
        fuse_projections(model.requires_grad_(False).language_model)
    mode = None if args.compile_mode == "none" else args.compile_mode
    decoder = GraphDecoder(model, max_cache_len=256, compile_mode=mode)
    ids = torch.randint(0, 150000, (1, PROMPT_GEN), generator=torch.Generator().manual_seed(0)).to(dev)
    ids[:, 5:37] = EXTRA_0
    decoder.generate(ids, pixel_values=torch.randn(1, 3, 224, 224, device=dev), max_new_tokens=8)
    llm = model.language_model
    streamed = sum(p.numel() * p.element_size() for p in llm.parameters()) - llm.get_input_embeddings().weight.nbytes
    print(f"# decode step profile, MiniGPT4Qwen-{args.size}, compile mode {mode}, cuDNN attention "
          f"{'off' if args.no_cudnn_attention else 'allowed'}, projections {'fused' if args.fused else 'separate'} "
          f"| {machine()}")
    print(f"weights read per token: {streamed / 1e9:.2f} GB")
    sync(dev)
    start = time.perf_counter()
    for _ in range(STEPS):
        decoder._decode_call(sample=False)()  # the captured graph
    sync(dev)
    print(f"graph replay: {(time.perf_counter() - start) / STEPS * 1000:.2f} ms per token")
    activity = ProfilerActivity.CUDA if dev.startswith("cuda") else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(STEPS):
            decoder._decode_step(False)  # the same step without the graph: kernels are visible
        sync(dev)
    kind = torch.autograd.DeviceType.CUDA if dev.startswith("cuda") else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    def self_time(e) -> float:
        return e.self_device_time_total if kind == torch.autograd.DeviceType.CUDA else e.self_cpu_time_total

    total = sum(self_time(e) for e in events) / STEPS / 1000
    print(f"kernel time {total:.2f} ms per token (without launch gaps); top kernels per token:")
    for e in sorted(events, key=lambda e: -self_time(e))[:18]:
        per = self_time(e) / STEPS / 1000
        print(f"  {per:6.3f} ms  x{e.count // STEPS:<4} {e.key[:110]}")


if __name__ == "__main__":
    main()
