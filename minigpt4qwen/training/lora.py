"""LoRA adapters on the LLM through `peft`: the adapter weights train, the base LLM weights stay frozen.

Applied after `set_trainable`: the base LLM weights keep requires_grad False (so trainable-only checkpoints hold
just the adapters and the other trainable parts), while the LLM follows train mode so the adapters' dropout acts.
"""

from __future__ import annotations

from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.training.config import LoraConfig


def apply_lora(model: MiniGPT4Qwen, cfg: LoraConfig) -> int:
    """Wraps `model.language_model` in a peft LoRA model (in place).

    Args:
        model: the model, with `set_trainable` already applied.
        cfg: rank, alpha, dropout and target module names.

    Returns:
        The number of trainable LoRA parameters (elements).

    Raises:
        ImportError: peft is not installed.
        ValueError: no module of the LLM matches `cfg.target_modules`.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ImportError("train.lora.enabled=true needs peft: pip install 'minigpt4qwen[train]'") from None
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, peft_cfg)
    lora_params = [p for name, p in model.language_model.named_parameters() if "lora_" in name]
    if not lora_params:
        raise ValueError(f"no LLM module matches train.lora.target_modules={list(cfg.target_modules)}")
    for p in lora_params:
        p.requires_grad_(True)
    # A frozen part is pinned to eval mode, which would also switch off the adapters' dropout; the LLM follows
    # the model's mode instead (Qwen's own dropout rates are 0, so only the adapters' dropout changes).
    model.frozen_parts.discard("language_model")
    model.train(model.training)
    return sum(p.numel() for p in lora_params)
