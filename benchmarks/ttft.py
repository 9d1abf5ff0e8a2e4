"""Where the time to first token goes: image encoder, embedding merge, LLM prefill; eager and from CUDA graphs.

    python -m benchmarks.ttft --size 7b      # one GPU; batch 1, a 63-token prompt with one image
    python -m benchmarks.ttft --size 14b --quantize int4   # the LLM quantized in place first (torchao)
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench import EXTRA_0, PROMPT_GEN
from benchmarks.common import build_random_model, machine, sync
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder, prefill_bucket
from minigpt4qwen.model.fused_projections import fuse_projections
from minigpt4qwen.model.gemlite_layers import route_through_gemlite
from minigpt4qwen.model.parts import PartDtypes
from minigpt4qwen.model.quantization import quantize_language_model


def timed(fn, device: str, repeats: int = 10) -> float:
    """Best-of-`repeats` wall time of `fn()` in ms (after two warm-up calls)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1000


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantize the LLM's weights first (torchao)")
    parser.add_argument("--fused", action="store_true", help="fuse q/k/v and gate/up (as load_for_inference does)")
    parser.add_argument("--kernels", default="torchao", choices=["torchao", "gemlite"],
                        help="what computes the quantized layers (--quantize-kernels)")
    args = parser.parse_args()
    dev = args.device
    model = build_random_model(args.size, dev, PartDtypes("bf16", "bf16", "bf16", "bf16", "bf16")).eval()
    if args.quantize:
        quantize_language_model(model.requires_grad_(False), args.quantize)
    if args.fused:
        fuse_projections(model.requires_grad_(False).language_model)
    if args.quantize and args.kernels == "gemlite":
        route_through_gemlite(model.language_model)
    ids = torch.randint(0, 150000, (1, PROMPT_GEN), generator=torch.Generator().manual_seed(0)).to(dev)
    ids[:, 5:37] = EXTRA_0
    px = torch.randn(1, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    feats = model.encode_images(px)
    llm = (f", LLM {args.quantize} ({args.kernels})" if args.quantize else "")
    llm += ", projections fused" if args.fused else ""
    print(f"# time to first token, MiniGPT4Qwen-{args.size}{llm}, batch 1, {PROMPT_GEN}-token prompt | {machine()}")
    vit = timed(lambda: model.vision_model(pixel_values=px), dev)
    enc = timed(lambda: model.encode_images(px), dev)
    emb = timed(lambda: model.embed(ids, feats), dev)
    prefill = timed(lambda: model.language_model(inputs_embeds=model.embed(ids, feats), logits_to_keep=1), dev)
    first = timed(lambda: model.generate(ids, pixel_values=px, max_new_tokens=1, do_sample=False), dev)
    print(f"eager: ViT {vit:.1f} ms | ViT+Q-Former+projection {enc:.1f} | embed+merge {emb:.1f} | "
          f"LLM prefill {prefill:.1f} | whole first token (generate) {first:.1f}", flush=True)
    decoder = GraphDecoder(model, max_cache_len=256)
    decoder.generate(ids, pixel_values=px, max_new_tokens=1)  # captures the encoder and prefill graphs
    g_enc = timed(lambda: decoder.encode_images(px), dev)
    bucket = prefill_bucket(PROMPT_GEN, decoder.max_cache_len)
    g_prefill = timed(decoder._prefill_call(bucket, sample=False), dev)
    g_first = timed(lambda: decoder.generate(ids, pixel_values=px, max_new_tokens=1), dev)
    print(f"CUDA graphs: ViT+Q-Former+projection {g_enc:.1f} ms | LLM prefill (padded to {bucket}) {g_prefill:.1f} | "
          f"whole first token (GraphDecoder) {g_first:.1f}", flush=True)


if __name__ == "__main__":
    main()
