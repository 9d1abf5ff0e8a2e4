"""Model presets that find weights where the original MiniGPT4Qwen project kept them.

An existing user's folder works as is: `cache/ckpt/eva/eva_vit_g.pth`, `cache/ckpt/blip2/
blip2_pretrained_flant5xxl.pth`, `cache/ckpt/Qwen7B-chat` (and `cache/ckpt/Qwen-14B-Chat` for 14B). Newer LLMs go
beside them under their Hugging Face names (`cache/ckpt/Qwen2.5-7B-Instruct`, `cache/ckpt/Llama-3.1-8B-Instruct`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minigpt4qwen.config import ModelConfig

# The BLIP-2 vision stack every preset shares (the original's files).
_VISION = {
    "vision_weights": "ckpt/eva/eva_vit_g.pth",
    "qformer_weights": "ckpt/blip2/blip2_pretrained_flant5xxl.pth",
}
# Paths relative to `ModelConfig.cache_root`: the original's WEIGHT.md and model YAMLs for Qwen-7B/14B-Chat; the
# Hugging Face repository names under ckpt/ for the newer LLMs, which render prompts with their own chat
# templates (recipes: configs/train_<name>.yaml with data.chat_format=template).
PRESETS: dict[str, dict[str, str]] = {
    "qwen7b_chat": {"llm": "ckpt/Qwen7B-chat", **_VISION},
    "qwen14b_chat": {"llm": "ckpt/Qwen-14B-Chat", **_VISION},
    "qwen25_7b_instruct": {"llm": "ckpt/Qwen2.5-7B-Instruct", **_VISION},
    "qwen25_14b_instruct": {"llm": "ckpt/Qwen2.5-14B-Instruct", **_VISION},
    "qwen3_8b": {"llm": "ckpt/Qwen3-8B", **_VISION},
    "llama31_8b_instruct": {"llm": "ckpt/Llama-3.1-8B-Instruct", **_VISION},
}


def resolve_preset(cfg: ModelConfig) -> ModelConfig:
    """Returns a copy of `cfg` whose empty weight paths are filled from its preset.

    Raises:
        ValueError: an unknown preset name.
    """
    if cfg.preset is None:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    root = Path(cfg.cache_root)
    filled = {key: str(root / rel) for key, rel in PRESETS[cfg.preset].items() if getattr(cfg, key) is None}
    return dataclasses.replace(cfg, **filled)
