"""Next-token loss computed only where labels exist.

The LM head is applied to the supervised positions alone: with 152k-word vocabularies the full [B, T, V] logits
tensor is the largest activation of a training step, while answers are a fraction of the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T-1] bool mask of positions whose *next* token is supervised."""
    return labels[:, 1:] != IGNORE_INDEX


def masked_lm_loss_sum(
    hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_rows: int = 8192
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and their count.

    Args:
        hidden_states: [B, T, H] final hidden states of the LLM.
        labels: [B, T] targets aligned with the inputs (position t is predicted from positions < t);
            `IGNORE_INDEX` where nothing is learned.
        lm_head: the output projection, applied only to the selected rows.
        chunk_rows: rows per LM-head call, bounding the fp32 logits memory to chunk_rows x vocab.

    Returns:
        (loss_sum, num_tokens). `loss_sum` is a scalar tensor attached to the graph (zero if nothing is supervised),
        so callers can average exactly over accumulation steps and processes.
    """
    mask = supervised_positions(labels)  # [B, T-1]
    rows = hidden_states[:, :-1][mask]  # [N, H]
    targets = labels[:, 1:][mask]  # [N]
    num_tokens = int(targets.numel())
    if num_tokens == 0:
        return hidden_states.sum() * 0.0, 0
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, num_tokens, chunk_rows):
        logits = lm_head(rows[start : start + chunk_rows]).float()  # [n, V]
        total = total + F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return total, num_tokens
