"""Process-group setup from the torchrun environment, DDP wrapping from outside the model, and reductions.

One process (no RANK in the environment) needs no process group; every helper then degrades to a no-op.
gloo is used on CPU, nccl on GPU.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minigpt4qwen.model.float8_weights import float8_weight_buffer_names
from minigpt4qwen.model.quantization import quantized_parameter_names


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Joins the process group described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    Args:
        device: "cpu" or "cuda" (default: cuda when available).

    Returns:
        The process's `DistInfo` (rank 0 of 1 without torchrun).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wraps `model` when running in several processes; returns it unchanged otherwise.

    find_unused_parameters stays off: every trainable part takes part in every forward pass (a batch without
    images still reaches the image path, see `model.loss.image_path_anchor`), and the unused-parameter search
    costs a graph traversal per step.
    """
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # A quantized LLM (model.quantize) is frozen and loaded alike on every rank; DDP could not broadcast it. Weights
    # stored in float8 (model.float8_weights) are cast alike on every rank; DDP would broadcast them every step.
    ignored = quantized_parameter_names(model) + float8_weight_buffer_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sums `tensor` over the processes of `group` (default: all) in place (no-op in one process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every process's `obj`, in rank order ([obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Waits for all processes (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leaves the process group cleanly: a barrier first, so no rank exits while others still communicate.

    Call it once the DDP-wrapped models are released: a DDP reducer freed after its group is destroyed runs the
    gloo group's destructor with the GIL held, which can wait forever for a gloo thread waiting for the GIL.
    """
    gc.collect()  # DDP reducers that only reference cycles still hold
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
