"""Held-out exact-match accuracy of the demo's model, asked the way `minigpt4qwen generate` and `chat` ask.

The questions go through the batch-inference path (`generate_batch`: the chat front ends' prompt, system turn
and greedy decoding), so the accuracy printed is the accuracy a user of the exported model meets.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.images import load_image
from minigpt4qwen.demo import shapes
from minigpt4qwen.inference.frontends.batch import Prompt, generate_batch
from minigpt4qwen.inference.generation import GenerationSettings
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

# Greedy, and enough for the longest answer (3 tokens) and `<|im_end|>`, so an untrained model stops early too.
ANSWER_SETTINGS = GenerationSettings(max_new_tokens=8)


@dataclass(frozen=True)
class Scores:
    """Right and asked answers per question kind (shapes.KINDS)."""

    right: dict[str, int]
    asked: dict[str, int]

    def accuracy(self, kind: str | None = None) -> float:
        """Accuracy of one kind, or over every question (None)."""
        if kind is None:
            return sum(self.right.values()) / sum(self.asked.values())
        return self.right[kind] / self.asked[kind]

    def chance(self) -> float:
        """The accuracy of guessing uniformly among each kind's answers, over these questions."""
        return sum(shapes.CHANCE[kind] * n for kind, n in self.asked.items()) / sum(self.asked.values())


def evaluate(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, annotation: Path, image_root: Path,
             batch_size: int = 128) -> Scores:
    """Asks every question of a demo annotation file and counts exact answers per kind.

    Args:
        model: the trained model (put in eval mode here).
        tokenizer: its tokenizer.
        annotation: a split written by `shapes.generate`.
        image_root: its image folder.
        batch_size: questions per `generate` call.
    """
    records = json.loads(annotation.read_text(encoding="utf-8"))
    model.eval()
    right: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [Prompt(index=start + i, id=start + i, query=r["instruction"], images=(str(image_root / r["image"]),))
                   for i, r in enumerate(chunk)]
        images = [[load_image(p.images[0])] for p in prompts]
        replies = generate_batch(model, tokenizer, prompts, images, ANSWER_SETTINGS)
        for record, reply in zip(chunk, replies, strict=True):
            asked[record["kind"]] += 1
            right[record["kind"]] += reply == record["output"]
    return Scores(right={k: right[k] for k in shapes.KINDS}, asked={k: asked[k] for k in shapes.KINDS})
