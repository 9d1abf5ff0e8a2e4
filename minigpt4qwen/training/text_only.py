"""Steps without images: what a step's batches count, and what a step that holds no image leaves alone.

Text-only records mix with image records in one training set. A text-only batch still reaches the image path,
with an exactly zero gradient (`model.loss.image_path_anchor`), so every engine runs the same collectives on every
rank. Its tokens count in the step's loss like any others. What must not happen is an optimizer step on the image
path from a step in which no micro-batch of any rank held an image: AdamW would still move weights whose gradient
is zero (weight decay, and the moments of earlier steps). `ImageFreeStepGuard` prevents that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from minigpt4qwen.model.loss import IMAGE_PATH_PARTS, supervised_positions
from minigpt4qwen.training.distributed import all_reduce_sum


def count_supervised(batch: dict) -> int:
    """Supervised (next-token) positions of a collated batch: the loss's denominator."""
    return int(supervised_positions(batch["labels"]).sum())


def count_images(batch: dict) -> int:
    """Images of a collated batch (0 for a text-only one, whether `pixel_values` is empty or absent)."""
    pixels = batch.get("pixel_values")
    return 0 if pixels is None else int(pixels.shape[0])


def step_counts(micro: Sequence[dict], device: torch.device,
                group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(supervised tokens, images) of a step: all its micro-batches, summed over the processes of `group`.

    Args:
        micro: this process's micro-batches of the step.
        device: where the summed tensor lives (NCCL reduces CUDA tensors only, gloo CPU ones).
        group: the data-parallel processes (default: all).
    """
    counts = torch.tensor([[count_supervised(b), count_images(b)] for b in micro], dtype=torch.float64)
    total = all_reduce_sum(counts.sum(dim=0).to(device), group)
    return int(total[0].item()), int(total[1].item())


class ImageFreeStepGuard:
    """An optimizer step pre-hook: in a step without any image, the image path's gradients are dropped.

    AdamW skips parameters without a gradient, so their weights, moments and step counts stay as they were, as
    for an unused parameter in one process. The parameter groups are found by the part in their `name` (see
    `optim.param_groups`), which DeepSpeed keeps when it swaps a group's parameters for its flat fp32 partitions:
    the hook works on our AdamW under every engine, ZeRO stages included. Set `images` (the step's global image
    count) before each step; None (unknown) drops nothing.
    """

    def __init__(self) -> None:
        self.images: int | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.images != 0:
            return
        for group in optimizer.param_groups:
            if group.get("name", "").split("/")[0] in IMAGE_PATH_PARTS:
                for param in group["params"]:
                    param.grad = None
