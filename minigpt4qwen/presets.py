"""Model presets that find weights where the original MiniGPT4Qwen project kept them.

An existing user's folder works as is: `cache/ckpt/eva/eva_vit_g.pth`, `cache/ckpt/blip2/
blip2_pretrained_flant5xxl.pth`, `cache/ckpt/Qwen7B-chat` (and `cache/ckpt/Qwen-14B-Chat` for 14B).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minigpt4qwen.config import ModelConfig

# Paths relative to `ModelConfig.cache_root`, as in the original's WEIGHT.md and model YAMLs.
PRESETS: dict[str, dict[str, str]] = {
    "qwen7b_chat": {
        "llm": "ckpt/Qwen7B-chat",
        "vision_weights": "ckpt/eva/eva_vit_g.pth",
        "qformer_weights": "ckpt/blip2/blip2_pretrained_flant5xxl.pth",
    },
    "qwen14b_chat": {
        "llm": "ckpt/Qwen-14B-Chat",
        "vision_weights": "ckpt/eva/eva_vit_g.pth",
        "qformer_weights": "ckpt/blip2/blip2_pretrained_flant5xxl.pth",
    },
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
