"""Training throughput on the original's length mix: padded vs packed batches, and plain transformers padded.

    python -m benchmarks.length_mix --size 7b --attn flex_attention     # one GPU: the whole table, plain included
    python -m benchmarks.length_mix --size tiny --device cpu --batches 2 --steps 2 --max-lens 256,512  # smoke test
    python -m benchmarks.length_mix --size 7b --compile --engine ours --float8   # our rows, LLM matmuls in float8

Rows per max_txt_len and micro-batch, on the same samples: ours padded (random batches: `DataCollator`), ours
padded with `data.group_by_length` batches (`epoch_plan` with lengths), both with --padded-attn (sdpa, the project's
default); ours packed (`PackingCollator`: positions restarting per sample, --attn, rows of --pack-length, by
default what an unset data.pack_length gives that attention); and transformers' `Blip2ForConditionalGeneration`
padded (random batches, its own full-logits loss). Projection-only training as in `benchmarks/bench.py` (bf16
towers and LLM, fp32 projection, bf16 autocast, AdamW). Printed: samples/s, real (non-pad) tokens/s, the share of
padding in the batch tensors, and peak GPU memory.

The length distribution. The original MiniGPT4Qwen trained on 18.8k image-text pairs (README of
github.com/Coobiw/MiniGPT4Qwen: MMPretrain's processing of MiniGPT-4's and LLaVA's instruction data, released as
minigpt4/ and llava/ annotation files), its recipe cutting samples at max_txt_len 256. Records and text lengths
per source, and where they come from:

- cc_sbu_align, 3,439 records (MiniGPT-4's second-stage filter_cap.json; "3,500 pairs" in its paper and dataset
  card, huggingface.co/datasets/Vision-CAIR/cc_sbu_align): one image, one turn. The question is one of MiniGPT-4's
  description prompts ("Describe this image in detail.": 6 Qwen tokens; listed in open-mmlab/mmpretrain's
  configs/minigpt4). The answer is a ChatGPT-refined description that generation continued until it passed 80
  LLaMA tokens (MiniGPT-4 paper, arXiv 2304.10592, section 3.2): log-normal, mean 110 Qwen tokens, sigma 0.3.
- LLaVA-Instruct, the other 15,361 records. Which subsets MMPretrain took is not published where we looked: they
  are drawn in LLaVA-Instruct-158K's proportions, 58K conversation : 23K detail : 77K complex reasoning (LLaVA
  paper; file sizes in github.com/haotian-liu/LLaVA docs/Data.md: 126 MB, 20.5 MB, 79.6 MB). Text per record =
  (file bytes / records - JSON framing, ~100 bytes + ~45 per message) / 4.8 characters per Qwen token (measured
  on a MiniGPT-4-style English description with tests/data's Qwen tokenizer): detail 891 B -> ~146 tokens
  (question ~9, answer ~137); complex reasoning 1,034 B -> ~176 (question ~20, answer ~156); conversation
  2,172 B -> ~374 over an assumed mean of 3.1 rounds (1-5 with probabilities .05/.25/.35/.25/.10): question ~12,
  answer ~108 per round. Questions and answers log-normal around these means (sigma 0.3 / 0.35).

Every sample has one image (32 placeholders inside <Img></Img>: 38 tokens) in its first question, the ChatML
system turn (11 tokens) and 5 framing tokens per message; learned: each answer and its <|im_end|>. Over-long
samples are fitted as `data.truncation: shorten` does: the oldest image-free history rounds go first (the last
round stays), then the last answer's tail. The numbers above are estimates (about +-20%), not a read of the
released files. What they give (printed first): ~286 tokens per sample uncut (median 233, p90 518, longest
~950); at the recipe's 256, 41% are shortened, 3% dropped and the mean is 217. Random batches of 8 are then ~85%
real tokens at 256 and ~53% uncut: the share of padding, the most packing can save, depends mostly on max_txt_len.
"""

from __future__ import annotations

import argparse
import gc
import math
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.common import EXTRA_0, build_random_model, build_random_plain, machine, reset_peak, timed_training
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.packing import PackingCollator, default_pack_length
from minigpt4qwen.data.sampler import epoch_plan
from minigpt4qwen.model.compilation import compile_blocks
from minigpt4qwen.model.float8 import apply_float8
from minigpt4qwen.model.float8_weights import store_float8_weights
from minigpt4qwen.model.parts import PartDtypes, TrainableParts

PAD_ID, IGNORE = 151643, -100
SYSTEM_TURN, MESSAGE_FRAMING, IMAGE_TOKENS = 11, 5, 32 + 6
IMAGE = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Source:
    """One part of the mix: its records and the token lengths of its question-answer rounds."""

    name: str
    records: int
    rounds: tuple[float, ...]  # probability of 1, 2, ... rounds
    question: float  # mean tokens
    answer: float
    question_sigma: float = 0.3
    answer_sigma: float = 0.35


LLAVA = 18_800 - 3_439
MIX = (
    Source("cc_sbu_align", 3_439, (1.0,), question=6, answer=110, question_sigma=0.0, answer_sigma=0.3),
    Source("llava conversation", round(LLAVA * 58 / 158), (0.05, 0.25, 0.35, 0.25, 0.10), question=12, answer=108),
    Source("llava detail", round(LLAVA * 23 / 158), (1.0,), question=9, answer=137),
    Source("llava complex reasoning", LLAVA - round(LLAVA * 58 / 158) - round(LLAVA * 23 / 158), (1.0,),
           question=20, answer=156),
)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> int:
    return max(1, round(mean * math.exp(rng.normal(-sigma * sigma / 2, sigma)))) if sigma else round(mean)


def draw_rounds(seed: int = 0) -> list[list[tuple[int, int]]]:
    """The 18.8k samples of the mix as (question tokens, answer tokens) per round, in a seeded order."""
    rng = np.random.default_rng(seed)
    samples = []
    for source in MIX:
        for _ in range(source.records):
            n = 1 + int(rng.choice(len(source.rounds), p=source.rounds))
            samples.append([(_lognormal(rng, source.question, source.question_sigma),
                             _lognormal(rng, source.answer, source.answer_sigma)) for _ in range(n)])
    return [samples[i] for i in rng.permutation(len(samples))]


def sample_length(rounds: list[tuple[int, int]]) -> int:
    return SYSTEM_TURN + IMAGE_TOKENS + sum(2 * MESSAGE_FRAMING + q + a for q, a in rounds)


def fit(rounds: list[tuple[int, int]], max_len: int) -> list[tuple[int, int]] | None:
    """`truncation: shorten` on the round structure: the oldest image-free history rounds go first (the first
    round holds the image, the last is kept), then the last answer's tail; None where even that does not fit
    (the dataset drops such a sample)."""
    rounds = list(rounds)
    while sample_length(rounds) > max_len and len(rounds) > 2:
        del rounds[1]
    q, a = rounds[-1]
    rounds[-1] = (q, a - max(0, sample_length(rounds) - max_len))
    return rounds if rounds[-1][1] >= 1 else None


def make_item(rounds: list[tuple[int, int]], rng: np.random.Generator) -> dict:
    """A dataset item with these lengths: random text ids, one image's placeholders, learned answers + <|im_end|>.
    Every item shares one random image (the towers' cost does not depend on its values)."""
    ids: list[int] = list(rng.integers(0, 150_000, SYSTEM_TURN))
    labels = [IGNORE] * SYSTEM_TURN
    for k, (q, a) in enumerate(rounds):
        question = list(rng.integers(0, 150_000, MESSAGE_FRAMING + q + (6 if k == 0 else 0)))
        if k == 0:
            question[6:6] = [EXTRA_0] * 32  # after "<|im_start|>user\n<Img>"
        answer = list(rng.integers(0, 150_000, MESSAGE_FRAMING + a))
        ids += question + answer
        labels += [IGNORE] * len(question) + [IGNORE] * 3 + answer[3:-1] + [IGNORE]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": IMAGE}


def describe(samples: list[list[tuple[int, int]]], max_lens: list[int]) -> None:
    """Prints the length distribution of the mix at each max_txt_len (tokens per sample, after fitting)."""
    print("\n| max_txt_len | mean | median | p90 | max | shortened | dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    full = np.array([sample_length(s) for s in samples])
    for max_len in max_lens:
        kept = [f for f in (fit(s, max_len) for s in samples) if f is not None]
        cut = np.array([sample_length(s) for s in kept])
        print(f"| {max_len} | {cut.mean():.0f} | {np.median(cut):.0f} | {np.percentile(cut, 90):.0f} | {cut.max()} "
              f"| {(full > max_len).mean():.1%} | {1 - len(kept) / len(samples):.1%} |")


def batches(lengths: list[int], args, grouped: bool, batch: int) -> list[list[int]]:
    """Sample indices of warm-up + timed steps: random, or grouped by length as `data.group_by_length` does."""
    plan = epoch_plan(len(lengths), batch, args.seed, 0, lengths if grouped else None)
    return plan[1 : 1 + args.warmup + args.steps]  # the grouped plan's first batch is its longest: skip it


def row(name: str, model, items, plan: list[list[int]], collate, args, plain: bool = False) -> None:
    """Collates, moves to the device, times and prints one table row."""
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")
    step_batches = []
    for indices in plan:
        data = {k: v.to(args.device) for k, v in collate([items[i] for i in indices]).items() if k in keys}
        if plain:
            data["pixel_values"] = data["pixel_values"].to(torch.bfloat16)
        step_batches.append(data)
    timed_plan = plan[args.warmup:]
    real = sum(len(items[i]["input_ids"]) for b in timed_plan for i in b) / len(timed_plan)
    cells = sum(step_batches[k]["input_ids"].numel() for k in range(args.warmup, len(plan))) / len(timed_plan)
    try:
        seconds, peak = timed_training(model, step_batches, args.warmup, args.device)
    except torch.OutOfMemoryError:
        print(f"| {name} | {len(plan[0])} | OOM | | | |", flush=True)
        return
    finally:
        del step_batches
        reset_peak(args.device)
    print(f"| {name} | {len(plan[0])} | {len(plan[0]) / seconds:.1f} | {real / seconds:.0f} | {1 - real / cells:.0%} "
          f"| {peak:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="8,16", help="micro-batch sizes (samples per step)")
    parser.add_argument("--max-lens", default="256,2048", help="max_txt_len values: 256 is the original's recipe")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", help="our packed rows' attention: sdpa, flex_attention, "
                        "flash_attention_2")
    parser.add_argument("--padded-attn", default="sdpa", help="our padded rows' attention")
    parser.add_argument("--pack-length", type=int, default=None, help="packed row length (0: one row per "
                        "micro-batch; default: data.pack_length's, by attention and max_txt_len)")
    parser.add_argument("--pad-to", type=int, default=8, help="pad_to_multiple_of of both collators")
    parser.add_argument("--engine", default="both", choices=["ours", "plain", "both"])
    parser.add_argument("--layouts", default="padded,grouped,packed", help="our rows: padded (random batches), "
                        "grouped (data.group_by_length), packed (data.packing)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each ViT and LLM block (ours)")
    parser.add_argument("--float8", action="store_true", help="our LLM blocks' matmuls in float8 (model.float8)")
    parser.add_argument("--float8-weights", action="store_true", help="with --float8: the frozen weights stored in "
                        "float8 (model.float8_weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    # One model runs every row (random and grouped lengths, two attention implementations, with and without
    # gradients): more variants of each compiled block than dynamo's default 8, past which blocks run eagerly and
    # a row would time that instead (the ninth session's group_by_length rows did).
    torch._dynamo.config.recompile_limit = 64
    max_lens = [int(v) for v in args.max_lens.split(",")]
    sizes = [int(b) for b in args.batches.split(",")]
    layouts = set(args.layouts.split(","))
    if not layouts <= {"padded", "grouped", "packed"}:
        parser.error(f"--layouts takes padded, grouped and packed, not {args.layouts!r}")
    mix = draw_rounds(args.seed)
    print(f"# MiniGPT4Qwen-{args.size}, the original's length mix (18.8k samples){' + compile' if args.compile else ''}"
          f"{' + float8 (ours)' if args.float8 else ''}{' + float8 weights' if args.float8_weights else ''} "
          f"| {machine()}")
    describe(mix, max_lens)
    rng = np.random.default_rng(args.seed)
    items = {m: [make_item(f, rng) for f in (fit(s, m) for s in mix) if f is not None] for m in max_lens}
    padded = DataCollator(PAD_ID, pad_to_multiple_of=args.pad_to)
    header = "| {} | micro-batch | samples/s | real tokens/s | padding | peak GiB |\n" + "| --- " * 6 + "|"
    if args.engine != "plain":
        model = build_random_model(args.size, args.device, PartDtypes("bf16", "bf16", "bf16", "fp32", "bf16"))
        model.set_trainable(TrainableParts())
        if args.float8:  # before compiling, as training does; the CPU smoke test takes torch's CPU fp8 matmul
            apply_float8(model, allow_cpu=args.device == "cpu")
            if args.float8_weights:
                store_float8_weights(model.language_model)
        if args.compile:
            compile_blocks(model)
        model.train()
        for m in max_lens:
            print(f"\n{header.format(f'ours, max_txt_len {m}')}")
            lengths = [len(item["input_ids"]) for item in items[m]]
            for b in sizes:
                model.language_model.set_attn_implementation(args.padded_attn)
                if "padded" in layouts:
                    row(f"padded, {args.padded_attn}", model, items[m], batches(lengths, args, False, b), padded,
                        args)
                if "grouped" in layouts:
                    row(f"padded, group_by_length, {args.padded_attn}", model, items[m],
                        batches(lengths, args, True, b), padded, args)
                if "packed" in layouts:
                    model.language_model.set_attn_implementation(args.attn)
                    pack = default_pack_length(args.attn, m) if args.pack_length is None else args.pack_length
                    packed = PackingCollator(PAD_ID, pack, pad_to_multiple_of=args.pad_to)
                    row(f"packed, {args.attn}, {f'rows of {pack}' if pack else 'one row'}", model, items[m],
                        batches(lengths, args, False, b), packed, args)
        del model
        gc.collect()
    if args.engine != "ours":
        model = build_random_plain(args.size, args.device)
        model.requires_grad_(False)
        model.language_projection.requires_grad_(True)
        model.train()
        for m in max_lens:
            print(f"\n{header.format(f'plain transformers (sdpa), max_txt_len {m}, same run')}")
            lengths = [len(item["input_ids"]) for item in items[m]]
            for b in sizes:
                row("padded", model, items[m], batches(lengths, args, False, b), padded, args, plain=True)


if __name__ == "__main__":
    main()
