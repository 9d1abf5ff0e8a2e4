"""`minigpt4qwen eval` speed: a synthetic MME-sized run (2,374 yes/no questions on 1,187 random JPEG images, in
MME's folder layout) through the real reader, runner (image decoding on threads, greedy answers decoded together
by the generation scheduler) and scorer, on a full-size model with random weights. Reports questions/s against
the 2-minute target.

    python -m benchmarks.eval_speed --size 7b                                    # one GPU
    python -m benchmarks.eval_speed --size tiny --device cpu --questions 48      # a CPU smoke run of the script

The random model never says its stop token, so every answer runs to --max-new-tokens (16, MME's default): a
trained model answering "Yes" stops after 2 tokens, so this is the slow case. Prompts are tokenised by a
word-level tokenizer (about one token per word, like Qwen's for these English questions), so prompt lengths are
realistic: system prompt + 32 image tokens + the question.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import build_random_model, machine, peak_gib, reset_peak, sync
from minigpt4qwen.evaluation import mme
from minigpt4qwen.evaluation.answering import Request, SchedulerAnswerer
from minigpt4qwen.evaluation.benchmarks import BENCHMARKS
from minigpt4qwen.evaluation.runner import evaluate
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.model.parts import PartDtypes
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT
from minigpt4qwen.text.tiny_tokenizer import IMAGE_PLACEHOLDER, build_tiny_chat_tokenizer

TARGET_SECONDS = 120.0
OBJECTS = "dog cat car person chair bottle cup bird horse clock bench book sink boat train bus".split()


def write_mme(root: Path, questions: int, seed: int = 0) -> list[str]:
    """An MME-layout folder of `questions` yes/no questions, two per random JPEG, over the 14 subtasks; returns
    the question texts (for the tokenizer's vocabulary)."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(questions // 2):
        folder = root / mme.SUBTASKS[i % len(mme.SUBTASKS)]
        folder.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(300, 800)), int(rng.integers(400, 1000))  # MME's images vary in size
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        a, b = OBJECTS[i % len(OBJECTS)], OBJECTS[(i + 5) % len(OBJECTS)]
        pair = [f"Is there a {a} in this image? Please answer yes or no.",
                f"Is there a {b} in this image? Please answer yes or no."]
        (folder / f"{i}.txt").write_text(f"{pair[0]}\tYes\n{pair[1]}\tNo\n", encoding="utf-8")
        texts += pair
    return texts


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--questions", type=int, default=2374, help="MME has 2,374")
    parser.add_argument("--batch-size", type=int, default=256, help="questions handed to the scheduler at once")
    parser.add_argument("--slots", type=int, default=128, help="questions decoded together")
    parser.add_argument("--slot-tokens", type=int, default=256, help="MME's prompts are about 80 tokens")
    parser.add_argument("--max-new-tokens", type=int, default=BENCHMARKS["mme"].max_new_tokens)
    args = parser.parse_args()
    dtype = "fp32" if args.device == "cpu" else "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "MME_Benchmark_release_version"
        start = time.perf_counter()
        texts = write_mme(data_dir, args.questions)
        print(f"wrote {len(texts)} questions on {len(texts) // 2} random JPEGs in {time.perf_counter() - start:.1f} s",
              flush=True)
        tokenizer = build_tiny_chat_tokenizer([DEFAULT_SYSTEM_PROMPT, *texts])
        model = build_random_model(args.size, args.device, PartDtypes.uniform(dtype)).eval()
        model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        scheduler = GenerationScheduler(model, tokenizer, slots=args.slots, capacity=args.slot_tokens)
        answerer = SchedulerAnswerer(scheduler, args.max_new_tokens)
        data = mme.read(data_dir)
        warm = [Request(texts[0], (Image.new("RGB", (224, 224)),))] * min(args.batch_size, 8)
        answerer.answer(warm)  # CUDA context, cuBLAS handles, allocator, first graphs: not an evaluation's cost
        reset_peak(args.device)
        sync(args.device)
        start = time.perf_counter()
        results, made = evaluate(BENCHMARKS["mme"], data, str(data_dir), Path(tmp) / "out", answerer,
                                 template=BENCHMARKS["mme"].template,
                                 settings={"prompt_template": BENCHMARKS["mme"].template,
                                           "system_prompt": DEFAULT_SYSTEM_PROMPT,
                                           "max_new_tokens": args.max_new_tokens},
                                 model={"size": args.size}, batch_size=args.batch_size)
        sync(args.device)
        seconds = time.perf_counter() - start
        scheduler.close()
    rate = made.answered_now / seconds
    print(f"# eval speed: synthetic MME ({made.answered_now} questions), MiniGPT4Qwen-{args.size} random weights "
          f"({dtype}), batch {args.batch_size}, {args.slots} slots, {args.max_new_tokens} new tokens per answer | "
          f"{machine()}")
    print(f"{seconds:.1f} s including image decoding and encoding: {rate:.1f} questions/s | peak "
          f"{peak_gib(args.device):.1f} GiB | target {TARGET_SECONDS:.0f} s for 2,374 questions: "
          f"{'met' if 2374 / rate <= TARGET_SECONDS else 'missed'} ({2374 / rate:.0f} s at this rate) | "
          f"scored {results['questions']['scored']} of {results['questions']['total']}")


if __name__ == "__main__":
    main()
