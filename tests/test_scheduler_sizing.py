"""The scheduler's default KV cache fits the card: tokens per slot from the memory free after loading."""

import json

import pytest
from transformers import Qwen2Config

from minigpt4qwen.checkpoint.qwen1 import qwen2_config_from_qwen1
from minigpt4qwen.inference.scheduler_options import MAX_AUTO_SLOT_TOKENS, slot_tokens_that_fit
from tests.reference import QWEN7B_DIR

GIB = 2**30


def test_qwen7b_bf16_slots_fit_the_free_memory():
    config = qwen2_config_from_qwen1(json.loads((QWEN7B_DIR / "config.json").read_text()))
    # 32 layers x 32 heads x 128 x (key + value) x 2 bytes = 0.5 MiB a token; 80% of 5 GiB over 32 slots.
    assert slot_tokens_that_fit(5 * GIB, 32, config, 2) == 256
    assert slot_tokens_that_fit(100 * GIB, 32, config, 2) == MAX_AUTO_SLOT_TOKENS  # capped
    assert slot_tokens_that_fit(5 * GIB, 8, config, 2) == 1024
    with pytest.raises(ValueError, match="fewer --slots"):
        slot_tokens_that_fit(GIB, 64, config, 2)


def test_grouped_query_attention_counts_key_value_heads():
    config = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    per_token = 2 * 28 * 4 * 128 * 2  # Qwen2.5-7B: 56 KiB a token
    assert slot_tokens_that_fit(per_token * 640 * 32 * 10 // 8, 32, config, 2) == 640  # 80% of it: 640 each
