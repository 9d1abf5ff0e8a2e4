"""Replaying a fixed-shape computation from a CUDA graph, so that a batch-1 step costs one launch, not hundreds.

At batch 1 a 7B decoder layer runs a dozen small kernels; launched one by one from Python, the launches take
longer than the kernels. A captured graph replays them all with one call. The function captured must read and
write only tensors whose addresses never change (static buffers, the static KV cache) and must not synchronise
with the host; `host_syncs` finds the ops that would, so that this can be tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CapturedCall:
    """`fn()` run eagerly `warmup` times on a side stream (lazy allocations, cuBLAS handles), then captured once;
    each call replays the graph and returns the tensors the capture returned (overwritten by the next replay).

    Args:
        fn: a function of no arguments over static buffers.
        pool: a memory pool (`torch.cuda.graph_pool_handle()`) shared by graphs that never run concurrently.
        warmup: eager runs before the capture.
    """

    def __init__(self, fn: Callable[[], Any], pool: Any = None, warmup: int = 2):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def __call__(self) -> Any:
        self.graph.replay()
        return self.output


def maybe_captured(fn: Callable[[], Any], enabled: bool, pool: Any = None, rehearse: bool = False) -> Callable[[], Any]:
    """A `CapturedCall` of `fn` when `enabled`, else `fn` itself (the CPU and debugging path: same code, eager).

    Args:
        rehearse: without capture, still run `fn` now as the capture's warm-up would (so CPU tests meet the
            state a capture meets).
    """
    if enabled:
        return CapturedCall(fn, pool)
    if rehearse:
        fn()
    return fn


class _SyncRecorder(TorchDispatchMode):
    """Records the ops that copy a device value to the host (`.item()`, `bool(tensor)`, `.tolist()`)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if any(name.startswith(op) for op in self.SYNCING):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """The host-synchronising ops `fn()` runs (works on the CPU); a graph capture of `fn` needs none.

    Returns:
        Their names in call order (empty when `fn` is capturable in this respect).
    """
    with _SyncRecorder() as recorder:
        fn()
    return recorder.ops
