"""Next-token loss computed only where labels exist, and kept connected to the image path without images.

The LM head is applied to the supervised positions alone: with 152k-word vocabularies the full [B, T, V] logits
tensor is the largest activation of a training step, while answers are a fraction of the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

IGNORE_INDEX = -100
# The parts only an image reaches; text reaches the language model alone.
IMAGE_PATH_PARTS = ("vision_model", "qformer", "query_tokens", "language_projection")
# Supervised rows per LM-head call by default (`masked_lm_loss_sum`).
LOSS_CHUNK_ROWS = 8192


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T-1] bool mask of positions whose *next* token is supervised."""
    return labels[:, 1:] != IGNORE_INDEX


def masked_lm_loss_sum(
    hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_rows: int | None = LOSS_CHUNK_ROWS
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and their count.

    Args:
        hidden_states: [B, T, H] final hidden states of the LLM.
        labels: [B, T] targets aligned with the inputs (position t is predicted from positions < t);
            `IGNORE_INDEX` where nothing is learned.
        lm_head: the output projection, applied only to the selected rows.
        chunk_rows: rows per LM-head call, bounding the fp32 logits memory to chunk_rows x vocab; the number of
            calls then follows the token count (none without supervised tokens). None: exactly one call whatever
            the count (on zero rows if nothing is supervised), for engines where every call is a collective that
            all ranks must make alike (ZeRO-3 gathers the head's weight per call); the logits are then N x vocab.

    Returns:
        (loss_sum, num_tokens). `loss_sum` is a scalar tensor attached to the graph (zero if nothing is supervised),
        so callers can average exactly over accumulation steps and processes.
    """
    mask = supervised_positions(labels)  # [B, T-1]
    rows = hidden_states[:, :-1][mask]  # [N, H]
    targets = labels[:, 1:][mask]  # [N]
    num_tokens = int(targets.numel())
    if chunk_rows is None:
        # One call even for N = 0: the sum over no rows is an exact 0 that still reaches the head's weight.
        logits = lm_head(rows).float()  # [N, V]
        return F.cross_entropy(logits, targets, reduction="sum"), num_tokens
    if num_tokens == 0:
        return hidden_states.sum() * 0.0, 0
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, num_tokens, chunk_rows):
        logits = lm_head(rows[start : start + chunk_rows]).float()  # [n, V]
        total = total + F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return total, num_tokens


def image_path_anchor(model: MiniGPT4Qwen, device: torch.device) -> torch.Tensor | None:
    """An exact zero that depends on every trainable parameter of the image path, for a batch without images.

    Added to a text-only batch's embeddings, it keeps the loss connected to the image path with a zero gradient.
    Why not skip the backward (or the image path) instead: every engine needs each trainable parameter reached on
    every rank in every step. Without it a projection-only step has nothing to differentiate ("element 0 of tensors
    does not require grad"); DDP (find_unused_parameters=False) would wait forever for the gradient buckets of the
    ranks that had images; ZeRO reduce-scatters per bucket and the pipeline's first stage sends gradients back
    through its output. With the anchor every rank runs the same collectives, and the image path's gradient is
    the sum over the ranks and micro-batches that did carry images, zero elsewhere.

    The image path runs on one blank image (zero images would not do: transformers' ViT attention cannot reshape
    an empty batch), through the modules' own forward, so ZeRO-3 gathers their parameters as usual; the product
    with 0 makes the gradient exactly zero (the blank image's features are finite).

    Args:
        model: the model whose image path (`IMAGE_PATH_PARTS`) is anchored.
        device: where the blank image is made (the batch's device).

    Returns:
        A 0-dim zero tensor attached to the graph, or None when gradients are off or nothing of the image path
        trains (then there is nothing to keep connected, and no blank image is encoded).
    """
    if not torch.is_grad_enabled():
        return None
    parts = [getattr(model, name) for name in IMAGE_PATH_PARTS]
    params = (p for part in parts for p in ([part] if isinstance(part, nn.Parameter) else part.parameters()))
    if not any(p.requires_grad for p in params):
        return None
    size = model.config.vision_config.image_size
    blank = torch.zeros(1, 3, size, size, device=device)
    return model.encode_images(blank).sum() * 0.0
