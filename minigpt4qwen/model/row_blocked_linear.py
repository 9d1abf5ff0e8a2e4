"""An output head computed in blocks of vocabulary rows, for int8 weight-only heads.

torchao's weight-only int8 matmul (eager, and inside CUDA graphs captured from eager code) first casts the whole
int8 weight to the activation dtype: for a 14B model's head (152064 x 5120) that is a 1.45 GiB temporary, even for
the one row of logits a prefill or a decode step keeps, and a captured graph's memory pool keeps it reserved. In
blocks of `BLOCK_BYTES` only one block's copy exists at a time; the logits are the same (each output column
comes from its own weight row, block or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_BYTES = 128 * 2**20  # the largest cast copy of a block of weight rows


class RowBlockedLinear(nn.Linear):
    """`nn.Linear` whose output is computed `block_rows` output features at a time (same parameters, same state
    dict keys). Build it with `from_linear`."""

    block_rows: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_rows: int) -> RowBlockedLinear:
        """A RowBlockedLinear sharing `linear`'s parameters (nothing is copied)."""
        blocked = cls.__new__(cls)
        nn.Module.__init__(blocked)
        blocked.in_features, blocked.out_features = linear.in_features, linear.out_features
        blocked.weight, blocked.bias = linear.weight, linear.bias
        blocked.block_rows = block_rows
        return blocked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, self.block_rows):
            end = min(start + self.block_rows, self.out_features)
            bias = None if self.bias is None else self.bias[start:end]
            out[..., start:end] = F.linear(x, self.weight[start:end], bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_rows={self.block_rows}"


def block_output_head(llm: nn.Module, dtype_bytes: int = 2) -> bool:
    """Replaces the LLM's output head by a `RowBlockedLinear` (same parameters) when a cast copy of its weight in
    `dtype_bytes`-byte elements would exceed `BLOCK_BYTES`; returns whether it did (False: small, already blocked,
    or no Linear head)."""
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return False
    block_rows = max(1, BLOCK_BYTES // (head.in_features * dtype_bytes))
    if block_rows >= head.out_features:
        return False
    llm.set_output_embeddings(RowBlockedLinear.from_linear(head, block_rows))
    return True
