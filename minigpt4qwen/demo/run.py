"""`minigpt4qwen demo`: the whole pipeline on the CPU in a few minutes, ending in a model you can chat with.

Draws a coloured-shapes question-answering set, builds a word-level tokenizer and a tiny MiniGPT4Qwen from
scratch (every part trainable), trains it with the real trainer and data layer, measures held-out exact-match
accuracy per question kind against chance through the batch-inference path, exports the model as a Hugging Face
directory (`minigpt4qwen export`'s format) and answers one held-out question from that directory as
`minigpt4qwen chat --model-dir` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import tempfile
import time
from pathlib import Path

import torch

from minigpt4qwen.checkpoint.export import export_hf, load_exported
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.demo import shapes
from minigpt4qwen.demo.evaluate import ANSWER_SETTINGS, Scores, evaluate
from minigpt4qwen.demo.recipe import Recipe, build_model, data_config, train_config
from minigpt4qwen.inference.engine import chat
from minigpt4qwen.text.tiny_tokenizer import IMAGE_PLACEHOLDER, build_tiny_chat_tokenizer
from minigpt4qwen.training.trainer import Trainer

# The tiny model's matrices are too small to share out between threads: on 2 cores, one thread was as fast as two
# under light load (96 vs 95 ms a step) and far faster under heavy load, where two threads wait for each other
# (68 ms vs 1.8 s a step; measured with other jobs running).
DEFAULT_THREADS = 1


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What a demo run produced: held-out scores, the exported model directory and the time it took."""

    scores: Scores
    model_dir: Path
    wall_s: float
    cpu_s: float


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The default recipe with the options given (`steps`, `train_images`), checked.

    Raises:
        ValueError: a value no run can use, naming the option and what to pass.
    """
    changes = {name: getattr(args, name) for name in ("steps", "train_images") if getattr(args, name, None) is not None}
    return Recipe(**changes).check()


def train_and_export(recipe: Recipe, out: Path, seed: int = 0, progress_bar: bool = True) -> DemoResult:
    """Runs the demo's steps into `out` (data/, run/, model/) and prints what each one did.

    Args:
        recipe: the checked recipe.
        out: the output folder.
        seed: seeds the pictures, the initial weights and the data order.
        progress_bar: show the trainer's progress bar.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    print(f"[1/5] drawing the coloured-shapes set into {out / 'data'}")
    train_file, heldout_file = shapes.generate(
        out / "data", train_images=recipe.train_images, heldout_images=recipe.heldout_images, size=recipe.image_size,
        questions_per_image=recipe.questions_per_image, seed=seed)
    images = out / "data" / "images"
    tokenizer = build_tiny_chat_tokenizer(shapes.vocabulary())
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model = build_model(recipe, len(tokenizer), image_token_id, seed)
    train_set = ConversationDataset(data_config(recipe, train_file, images), tokenizer, train=True, seed=seed,
                                    image_token_id=image_token_id, num_query_tokens=recipe.num_queries)
    params = sum(p.numel() for p in model.parameters())
    print(f"[2/5] tiny MiniGPT4Qwen from scratch: {params / 1e6:.2f}M parameters, every part trainable; "
          f"{len(train_set)} training questions about {recipe.train_images} pictures")
    cfg = train_config(recipe, seed, out / "run", progress_bar)
    print(f"[3/5] training {recipe.steps} steps of {recipe.batch_size} questions on the CPU")
    result = Trainer(model, cfg, train_set, DataCollator(tokenizer.pad_token_id)).fit()
    print(f"      loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; checkpoint {result.checkpoint}")
    scores = evaluate(model, tokenizer, heldout_file, images)
    print(f"[4/5] held-out exact-match accuracy, {sum(scores.asked.values())} questions about "
          f"{recipe.heldout_images} new pictures (greedy, asked as `minigpt4qwen generate` asks):")
    for kind in shapes.KINDS:
        print(f"      {kind:7s} {scores.accuracy(kind):6.1%}  ({scores.right[kind]}/{scores.asked[kind]}; "
              f"chance {shapes.CHANCE[kind]:.1%})")
    print(f"      overall {scores.accuracy():6.1%}  (chance {scores.chance():.1%})")
    model_dir = export_hf(model, tokenizer, out / "model")
    example = json.loads(heldout_file.read_text(encoding="utf-8"))[0]
    picture, query = images / example["image"], shapes.QUESTIONS[example["kind"], example["language"]]
    # Reloaded from the directory, asked through the chat engine: what `chat --model-dir` will do.
    exported, exported_tokenizer = load_exported(model_dir)
    reply, _ = chat(exported, exported_tokenizer, query, images=[picture], settings=ANSWER_SETTINGS)
    print(f"[5/5] exported to {model_dir}; reloaded from there and asked about a held-out picture:\n"
          f"      {picture}\n      Q: {query}\n      A: {reply}   (truth: {example['output']})")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    threads = torch.get_num_threads()
    print(f"done in {wall:.0f} s ({cpu:.0f} s of CPU time, {threads} thread{'s' if threads > 1 else ''}). Next:\n"
          f"  minigpt4qwen chat --model-dir {shlex.quote(str(model_dir))} --image {shlex.quote(str(picture))} "
          f"--query {shlex.quote(query)}")
    return DemoResult(scores, model_dir, wall, cpu)


def run(args: argparse.Namespace) -> int:
    """Runs the demo; options are read with defaults, so any namespace works.

    Args:
        args: optional `output_dir` (default: a temporary folder), `steps` (optimizer steps), `train_images`
            (pictures to train on), `seed` (default 0), `threads` (torch CPU threads; default DEFAULT_THREADS),
            `progress_bar` (default True).

    Returns:
        0 when held-out accuracy beats chance, 1 otherwise.

    Raises:
        ValueError: an option no run can use (the message names it and what to pass).
    """
    recipe = recipe_from_args(args)
    seed = getattr(args, "seed", None)
    seed = 0 if seed is None else seed
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, not {seed}")
    threads = getattr(args, "threads", None)
    threads = DEFAULT_THREADS if threads is None else threads
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)
    out = Path(getattr(args, "output_dir", None) or tempfile.mkdtemp(prefix="minigpt4qwen-demo-"))
    result = train_and_export(recipe, out, seed, progress_bar=getattr(args, "progress_bar", True))
    return 0 if result.scores.accuracy() > result.scores.chance() else 1
