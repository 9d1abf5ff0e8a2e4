"""Placing image features on placeholder tokens: the one operation that joins vision and language.

Image rows are written, in order, onto the positions whose token id is the placeholder: row by row, left to
right, so the k-th image of the batch (in that order) fills the k-th run of `num_query_tokens` placeholders. A
packed row (`minigpt4qwen.data.packing`) holds several samples: its collator orders the images as the samples lie
in the rows, so each sample's images land on its own placeholders.
"""

from __future__ import annotations

import torch

from minigpt4qwen.model.device_copy import to_device_queued


def merge_image_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_features: torch.Tensor | None,
    image_token_id: int,
) -> torch.Tensor:
    """Returns `inputs_embeds` with placeholder rows replaced by image features.

    Args:
        inputs_embeds: [B, T, H] token embeddings.
        input_ids: [B, T] ids; positions equal to `image_token_id` receive image rows (on the embeddings' device,
            or on the host, where the checks then run without waiting for the device).
        image_features: [N, Q, H] projected query outputs for the N images of the batch, ordered by row then by
            position in the row; None for a text-only batch.
        image_token_id: the placeholder id.

    Raises:
        ValueError: the placeholder count is not N * Q, or some row holds a partial run of placeholders
            (e.g. a truncation cut through an image).
    """
    mask = input_ids == image_token_id  # [B, T]
    per_row = mask.sum(dim=1)  # [B] (a packed row holds several samples)
    num_queries = image_features.shape[1] if image_features is not None else None
    found = int(per_row.sum())
    expected = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
    if found != expected:
        images = 0 if image_features is None else image_features.shape[0]
        raise ValueError(
            f"the batch holds {found} image placeholder tokens (id {image_token_id}) but {images} image(s) "
            f"x {num_queries or 0} queries = {expected} image rows; per row: {per_row.tolist()}. "
            "Each image marker must expand to exactly num_query_tokens placeholders."
        )
    if found == 0:
        return inputs_embeds
    partial = (per_row % num_queries).nonzero().flatten().tolist()
    if partial:
        raise ValueError(f"rows {partial} hold a partial run of image placeholders (not a multiple of {num_queries})")
    features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds)  # [N*Q, H]
    if mask.device.type != "cpu":
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)
    # Ids on the host: the placeholder positions are found there, and a GPU gets them by a queued copy (a device-side
    # masked_scatter may wait for the GPU to count the mask). Same rows in the same order as masked_scatter.
    rows = to_device_queued(mask.flatten().nonzero().flatten(), inputs_embeds.device)
    flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
    return flat.index_copy(0, rows, features).view_as(inputs_embeds)
