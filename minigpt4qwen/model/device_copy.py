"""Copying host tensors to a GPU without waiting for it.

A plain `tensor.to("cuda")` from pageable host memory (and `cuda_tensor[i] = value`) synchronises: it returns only
once every kernel queued before it has run. Code that queues work ahead of the GPU (the generation scheduler) copies
through pinned memory instead, which the GPU reads in stream order.
"""

from __future__ import annotations

import torch


def to_device_queued(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the host to a GPU through pinned memory, queued behind the work already there."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
