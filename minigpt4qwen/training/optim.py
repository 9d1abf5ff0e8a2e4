"""AdamW parameter groups (weight-decay split, per-part learning rates) and the original's learning-rate schedule.

The schedule is a linear warm-up from 0 over `warmup_steps`, then a cosine from `lr` down to `min_lr` over the
remaining steps (the original applies the cosine per epoch; per step is smoother and independent of epoch size).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from minigpt4qwen.model.parts import PART_NAMES
from minigpt4qwen.training.config import TrainConfig

logger = logging.getLogger(__name__)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, learned queries and embeddings are not decayed (decay would shrink them to 0)."""
    lowered = name.lower()
    return (
        param.ndim < 2
        or "norm" in lowered
        or "query_tokens" in lowered
        or "embed" in lowered
        or "position_embedding" in lowered
    )


def _part(name: str) -> str:
    # DDP / peft wrappers may prefix names; the part is the first known component.
    for piece in name.split("."):
        if piece in PART_NAMES:
            return piece
    raise KeyError(f"parameter {name!r} belongs to no model part {PART_NAMES}")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Groups the trainable parameters by (part, decay) with their lr and weight decay.

    Args:
        model: the (unwrapped) model; only parameters with `requires_grad` are included.
        cfg: supplies lr, weight_decay and the per-part lr multipliers.

    Returns:
        A list of dicts for `torch.optim.AdamW`, each with a `name` for logging.

    Raises:
        ValueError: nothing is trainable.
    """
    multipliers = {p: getattr(cfg.lr_multipliers, p) for p in PART_NAMES}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_part(name), _no_decay(name, param)), []).append(param)
    if not groups:
        raise ValueError("no trainable parameters: check model.trainable (and train.lora)")
    return [
        {
            "params": params,
            "name": f"{part}/{'no_decay' if no_decay else 'decay'}",
            "lr": cfg.lr * multipliers[part],
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        }
        for (part, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg)` (the original's optimizer)."""
    beta1, beta2 = cfg.betas
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(beta1, beta2))


class WarmupCosine:
    """lr factor at a step: linear 0 -> 1 over `warmup_steps`, then cosine 1 -> min_lr/lr at `total_steps`.

    A callable object (not a lambda), so `LambdaLR.state_dict` records it and resuming restores it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule; call `.step()` once per optimizer step.

    Args:
        optimizer: its groups' initial lr are the peak values (per-part multipliers included).
        cfg: warmup_steps, lr and min_lr.
        total_steps: optimizer steps of the whole run.

    Returns:
        A `LambdaLR` whose factor at step t is `WarmupCosine(...)(t)`.
    """
    factor = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configured_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """What a run was configured with: every group's settings (not its tensors), the schedule's peak lrs and factor.

    Capture it before a checkpoint's states are loaded and put it back with `restore_configured_settings`.
    """
    return {"groups": [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs), "lambdas": scheduler.state_dict()["lr_lambdas"]}


def restore_configured_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                                configured: dict, source: str | Path = "") -> None:
    """Puts this run's settings back over those a checkpoint's optimizer and scheduler states brought in.

    Loading those states restores the saved run's lr, weight decay, betas, per-part multipliers and schedule; a
    resumed run (extended, or with a lower lr) trains with its own instead, from the saved step count on: the
    checkpoint contributes only the moments and the step count. Differences are logged.

    Args:
        optimizer, scheduler: with the checkpoint's states loaded.
        configured: `configured_settings` of the two, taken before the states were loaded.
        source: the checkpoint (named in the log).
    """
    changed = {}
    for group, new in zip(optimizer.param_groups, configured["groups"]):
        for key, value in new.items():  # "lr" is the saved step's scheduled value; "initial_lr" is the peak
            if key != "lr" and key not in changed and group.get(key) != value:
                changed[key] = f"{key} {group.get(key)} -> {value} ({new.get('name', 'group')})"
        group.update(new)
    if scheduler.state_dict()["lr_lambdas"] != configured["lambdas"]:
        changed["schedule"] = f"schedule {scheduler.state_dict()['lr_lambdas'][0]} -> {configured['lambdas'][0]}"
    scheduler.base_lrs = list(configured["base_lrs"])
    for factor, state in zip(scheduler.lr_lambdas, configured["lambdas"]):
        if state is not None:  # a plain function has no state: it is this run's own
            factor.__dict__.update(state)
    # The next step trains at the lr this run's schedule gives the step reached, as an uninterrupted run with these
    # settings would; without this it would use the saved run's value for one step.
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (DeepSpeed logs it)
    if changed:
        logger.warning("%s: continuing with this run's settings where they differ from the checkpoint's: %s",
                       source, "; ".join(changed.values()))
