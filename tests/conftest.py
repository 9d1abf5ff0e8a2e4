"""Shared fixtures: tiny models built in the test process, and the path of the read-only reference data."""

from pathlib import Path

import pytest
import torch

from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGE_TOKEN_ID = 5
NUM_QUERIES = 4


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED} (expected ../shared beside the repository)")
    return SHARED


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


@pytest.fixture
def tiny_model() -> MiniGPT4Qwen:
    return make_tiny_model()
