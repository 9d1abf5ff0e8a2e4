"""Every shipped YAML config loads through the typed loader (no unknown keys, right types, valid values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt4qwen.config import load_config
from minigpt4qwen.training.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"train_qwen7b.yaml", "train_qwen7b_3090x4.yaml", "train_qwen7b_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path, [], RunConfig)
    cfg.validate()
    assert path.read_text().startswith("#"), "each config starts with a header comment (prerequisites, launch)"


def test_original_recipe_values():
    cfg = load_config(Path(CONFIGS[0]).parent / "train_qwen7b.yaml", ["train.max_steps=10"], RunConfig)
    t = cfg.train
    assert (t.lr, t.min_lr, t.warmup_steps, t.weight_decay, t.epochs) == (1e-4, 1e-6, 500, 0.05, 10)
    assert (t.micro_batch_size, t.grad_accum, t.grad_clip, t.precision) == (1, 16, 1.0, "bf16")
    assert cfg.data.max_txt_len == 256 and t.max_steps == 10
    assert cfg.model.trainable.language_projection and not cfg.model.trainable.language_model
