"""The embedded default job: builds a tiny model and runs one forward/backward and one generation on the CPU.

The full demo (a visual question-answering task that trains in a few minutes) arrives with the trainer.
"""

from __future__ import annotations

import argparse

import torch

from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen


def run(args: argparse.Namespace) -> int:
    """Smoke-runs the model end to end; prints the loss and generated ids."""
    torch.manual_seed(0)
    config = minigpt4qwen_config(tiny_qwen2_config(), image_token_id=5, vision_config=tiny_vision_config(),
                                 qformer_config=tiny_qformer_config(), num_query_tokens=4)
    model = MiniGPT4Qwen(config)
    ids = torch.tensor([[2, 5, 5, 5, 5, 7, 8, 9]])
    out = model(ids, labels=ids, pixel_values=torch.randn(1, 3, 28, 28))
    out.loss.backward()
    print(f"loss {out.loss.item():.4f} over {out.num_tokens} tokens")
    print("generated", model.generate(ids, pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=5).tolist())
    print("NOTE: the training demo is not built yet (stub).")
    return 0
