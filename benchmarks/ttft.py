"""Where the time to first token goes: vision tower, Q-Former + projection, embedding merge, LLM prefill.

    python -m benchmarks.ttft --size 7b      # one GPU; batch 1, a 63-token prompt with one image
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench import EXTRA_0, PROMPT_GEN
from benchmarks.common import build_random_model, machine, sync
from minigpt4qwen.inference.static_greedy import StaticGreedyDecoder
from minigpt4qwen.model.compilation import compile_blocks
from minigpt4qwen.model.parts import PartDtypes


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = build_random_model(args.size, args.device, PartDtypes("bf16", "bf16", "bf16", "bf16", "bf16")).eval()
    ids = torch.randint(0, 150000, (1, PROMPT_GEN), generator=torch.Generator().manual_seed(0)).to(args.device)
    ids[:, 5:37] = EXTRA_0
    px = torch.randn(1, 3, 224, 224, device=args.device, dtype=torch.bfloat16)
    decoder = StaticGreedyDecoder(model, max_cache_len=256, compile=args.device.startswith("cuda"))
    print(f"# time to first token, MiniGPT4Qwen-{args.size}, batch 1 | {machine()}")
    for label in ("eager", "compiled blocks (ViT + LLM)"):
        try:
            row(model, decoder, ids, px, args.device, label)
        except Exception as err:  # a failing configuration must not hide the other row
            print(f"{label}: failed: {type(err).__name__}: {str(err)[:200]}")
        compile_blocks(model)


@torch.no_grad()
def row(model, decoder: StaticGreedyDecoder, ids: torch.Tensor, px: torch.Tensor, device: str, label: str) -> None:
    """Prints one breakdown line."""
    feats = model.encode_images(px)
    vit = timed(lambda: model.vision_model(pixel_values=px), device)
    enc = timed(lambda: model.encode_images(px), device)
    emb = timed(lambda: model.embed(ids, feats), device)
    prefill = timed(lambda: model.language_model(inputs_embeds=model.embed(ids, feats), logits_to_keep=1), device)
    first = timed(lambda: decoder.generate(ids, pixel_values=px, max_new_tokens=1), device)
    print(f"{label}: ViT {vit:.1f} ms | ViT+Q-Former+projection {enc:.1f} | embed+merge {emb:.1f} | "
          f"LLM prefill {prefill:.1f} | whole first token (static decoder) {first:.1f}", flush=True)

if __name__ == "__main__":
    main()
