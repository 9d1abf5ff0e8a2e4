"""An output head computed in blocks of vocabulary rows, for int8 weight-only heads.

torchao's weight-only int8 matmul (eager, and inside CUDA graphs captured from eager code) first casts the whole
int8 weight to the activation dtype: for a 14B model's head (152064 x 5120) that is a 1.45 GiB temporary, even for
the one row of logits a prefill or a decode step keeps, and a captured graph's memory pool keeps it reserved. In
blocks of `BLOCK_BYTES` only one block's copy exists at a time; the logits are the same (each output column
comes from its own weight row, block or not).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4qwen.model.linear_over import LinearOver

# The largest cast copy of a block of weight rows: small beside a 24 GB card's headroom, large enough that the
# blocks' extra kernel launches (10-12 for a Qwen head) cost nothing measurable (14B int4 decode: 181 vs 179 tok/s).
BLOCK_BYTES = 128 * 2**20
log = logging.getLogger(__name__)


class RowBlockedLinear(LinearOver):
    """`nn.Linear` whose output is computed `block_rows` output features at a time (same parameters, same state
    dict keys). Build it with `from_linear`."""

    block_rows: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_rows: int) -> RowBlockedLinear:  # type: ignore[override]
        """A RowBlockedLinear sharing `linear`'s parameters (nothing is copied)."""
        blocked = super().from_linear(linear)
        blocked.block_rows = block_rows
        return blocked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight, bias)`, one block of output features at a time."""
        ranges = [(start, min(start + self.block_rows, self.out_features))
                  for start in range(0, self.out_features, self.block_rows)]

        def block(start: int, end: int) -> torch.Tensor:
            return F.linear(x, self.weight[start:end], None if self.bias is None else self.bias[start:end])

        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # A cat's backward only slices the gradient; an output filled in place would copy it whole per block.
            return torch.cat([block(start, end) for start, end in ranges], dim=-1)
        out = None
        for start, end in ranges:
            y = block(start, end)
            if out is None:  # F.linear's dtype: under autocast it is not x's
                out = y.new_empty(*y.shape[:-1], self.out_features)
            out[..., start:end] = y
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
    blocked = RowBlockedLinear.from_linear(head, block_rows)
    llm.set_output_embeddings(blocked)
    if llm.get_output_embeddings() is not blocked:  # a head that is not `lm_head`: kept whole (works, costs memory)
        log.warning("%s did not take a row-blocked output head: its int8 head is cast whole in each forward",
                    type(llm).__name__)
        return False
    return True
