"""bf16 numerics at full size: the default mixed-precision setup vs an fp32 reference of the same random weights.

    python -m benchmarks.numerics --size 7b     # one GPU (~40 GB for the fp32 reference)

Prints the loss difference, logit error relative to the logit scale, and next-token argmax agreement.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench import training_batch
from benchmarks.common import build_random_model, machine
from minigpt4qwen.model.parts import PartDtypes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device_type = args.device.split(":")[0]
    model = build_random_model(args.size, args.device, PartDtypes.uniform("fp32")).eval()
    data = training_batch(args.batch, args.device, model.config.text_config.vocab_size)
    with torch.no_grad():
        ref_loss = model(**data).loss.float()
        ref_logits = model(data["input_ids"], pixel_values=data["pixel_values"]).logits.float()
        ref_tokens = model.generate(data["input_ids"][:1, :63], pixel_values=data["pixel_values"][:1],
                                    max_new_tokens=32, do_sample=False, pad_token_id=151643)
        # The shipped default: bf16 towers and LLM, fp32 Q-Former and projection, bf16 autocast.
        model.cast_parts(PartDtypes("bf16", "fp32", "fp32", "fp32", "bf16"))
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**data).loss.float()
            logits = model(data["input_ids"], pixel_values=data["pixel_values"]).logits.float()
            tokens = model.generate(data["input_ids"][:1, :63], pixel_values=data["pixel_values"][:1],
                                    max_new_tokens=32, do_sample=False, pad_token_id=151643)
    scale = ref_logits.abs().max().item()
    err = (logits - ref_logits).abs()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    same_prefix = int((tokens[0] == ref_tokens[0]).long().cumprod(0).sum())
    print(f"# bf16 vs fp32, MiniGPT4Qwen-{args.size}, random weights | {machine()}")
    relative = abs(loss - ref_loss).item() / ref_loss.item()
    print(f"loss fp32 {ref_loss.item():.5f} | bf16 {loss.item():.5f} | rel diff {relative:.2e}")
    print(f"logits: max |logit| {scale:.3f} | max abs err {err.max().item():.4f} | "
          f"mean abs err {err.mean().item():.5f}")
    print(f"next-token argmax agreement {agree:.4f} | greedy 32-token prefix identical for {same_prefix}/32 tokens")


if __name__ == "__main__":
    main()
