"""float8 against full precision on a task that learns: the demo's coloured-shapes run, twice from one seed.

    python -m benchmarks.float8_curve                       # the demo's recipe: 2 x ~4 min on 2 CPU cores
    python -m benchmarks.float8_curve --steps 300           # a shorter curve

Random full-size weights cannot show whether float8 matmuls hurt learning (there is nothing to learn), so this
trains the tiny demo model (`minigpt4qwen demo`: every width a multiple of 16) once as the demo does (fp32) and
once with its LLM blocks' Linear layers converted by `model.float8`'s `apply_float8` (torchao's float8 training:
e4m3 forward operands, e5m2 gradients, tensorwise scales). On the CPU torch's `_scaled_mm` rounds the operands
exactly as on a Hopper GPU but accumulates differently, and it is not fast: this measures the numerics, not the
speed. Unlike the published recipe, the demo trains the LLM too, so the weight-gradient matmuls are exercised as
well as the input-gradient ones that a frozen LLM needs. Printed: the mean loss per window of steps and the
held-out accuracy of each run.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.demo import shapes
from minigpt4qwen.demo.evaluate import Scores, evaluate
from minigpt4qwen.demo.recipe import Recipe, build_model, data_config, train_config
from minigpt4qwen.model.float8 import apply_float8
from minigpt4qwen.text.tiny_tokenizer import IMAGE_PLACEHOLDER, build_tiny_chat_tokenizer
from minigpt4qwen.training.trainer import Trainer


def train_once(recipe: Recipe, data: Path, out: Path, seed: int, float8: bool) -> tuple[list[float], Scores, float]:
    """One demo training run; returns its per-step losses, held-out scores and wall seconds."""
    tokenizer = build_tiny_chat_tokenizer(shapes.vocabulary())
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model = build_model(recipe, len(tokenizer), image_token_id, seed)
    if float8:
        converted = apply_float8(model, device=torch.device("cpu"), allow_cpu=True)
        print(f"float8: {converted} LLM Linear layers converted")
    images = data / "images"
    train_set = ConversationDataset(data_config(recipe, data / "train.json", images), tokenizer, train=True,
                                    seed=seed, image_token_id=image_token_id, num_query_tokens=recipe.num_queries)
    start = time.perf_counter()
    result = Trainer(model, train_config(recipe, seed, out, progress_bar=False), train_set,
                     DataCollator(tokenizer.pad_token_id)).fit()
    return result.losses, evaluate(model, tokenizer, data / "heldout.json", images), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=250, help="steps per printed loss mean")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the demo's setting (its recipe was measured with one thread)
    recipe = Recipe(steps=args.steps).check()
    print(f"# float8 vs fp32 on the demo task, {args.steps} steps, seed {args.seed} | {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_file, heldout_file = shapes.generate(
            work / "data", train_images=recipe.train_images, heldout_images=recipe.heldout_images,
            size=recipe.image_size, questions_per_image=recipe.questions_per_image, seed=args.seed)
        assert train_file.name == "train.json" and heldout_file.name == "heldout.json", (train_file, heldout_file)
        runs = {name: train_once(recipe, work / "data", work / name, args.seed, name == "float8")
                for name in ("fp32", "float8")}
    print(f"\n| steps | {' | '.join(f'{name} loss' for name in runs)} |")
    print(f"| --- | {' | '.join('---' for _ in runs)} |")
    for start in range(0, args.steps, args.window):
        means = []
        for losses, _, _ in runs.values():
            window = [x for x in losses[start: start + args.window] if not math.isnan(x)]
            means.append(f"{sum(window) / len(window):.4f}" if window else "-")
        print(f"| {start + 1}-{min(start + args.window, args.steps)} | {' | '.join(means)} |")
    print("\n| run | held-out accuracy | colour | shape | count | training s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (_, scores, seconds) in runs.items():
        kinds = " | ".join(f"{scores.accuracy(kind):.1%}" for kind in shapes.KINDS)
        print(f"| {name} | {scores.accuracy():.1%} | {kinds} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
