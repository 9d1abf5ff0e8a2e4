"""Shared fixtures: tiny models built in the test process (reference files: tests/reference.py)."""

import pytest
import torch

from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.tiny_tokenizer import build_tiny_chat_tokenizer

IMAGE_TOKEN_ID = 5
NUM_QUERIES = 4


def make_tiny_model(seed: int = 0, vocab_size: int = 64, num_queries: int = NUM_QUERIES) -> MiniGPT4Qwen:
    """A tiny fp32 MiniGPT4Qwen with random weights (vision 28 px / patch 7, Q-Former 2 layers, Qwen2 LLM)."""
    torch.manual_seed(seed)
    config = minigpt4qwen_config(
        tiny_qwen2_config(vocab_size=vocab_size),
        image_token_id=IMAGE_TOKEN_ID,
        vision_config=tiny_vision_config(),
        qformer_config=tiny_qformer_config(),
        num_query_tokens=num_queries,
    )
    model = MiniGPT4Qwen(config)
    # Random (not zero-init) norms and biases, so the parity tests exercise every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


CHAT_WORDS = "what colour is the shape red green blue circle square 图 中 的 形 状 是 什 么 颜 色".split()


def make_tiny_chat_model(seed: int = 0, image_std: float | None = None, redraw_biases: bool = False):
    """A tiny model with the demo's word-level ChatML tokenizer over `CHAT_WORDS`; returns (model, tokenizer).

    `image_std` redraws the weights of the image path (vision, Q-Former, projection) with that std, so that
    answers clearly depend on the image (random tiny towers barely tell images apart): the matrices and
    embeddings, or with `redraw_biases` every parameter except the norms.
    """
    tokenizer = build_tiny_chat_tokenizer(CHAT_WORDS)
    torch.manual_seed(seed)
    config = minigpt4qwen_config(tiny_qwen2_config(vocab_size=len(tokenizer)),
                                 image_token_id=tokenizer.convert_tokens_to_ids("<|extra_0|>"),
                                 vision_config=tiny_vision_config(), qformer_config=tiny_qformer_config(),
                                 num_query_tokens=4)
    model = MiniGPT4Qwen(config).eval()
    if image_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                chosen = "norm" not in name if redraw_biases else (param.dim() > 1 or "embeddings" in name)
                if not name.startswith("language_model.") and chosen:
                    param.normal_(0, image_std)
    return model, tokenizer


@pytest.fixture
def tiny_model() -> MiniGPT4Qwen:
    return make_tiny_model()
