"""Padding-free batches (`data.packing: true`): a micro-batch's samples laid end to end in one or a few rows.

A packed row holds several samples; `position_ids` restart at 0 for each of them and no `attention_mask` is
given. From exactly that input, transformers' attention (masking_utils: `find_packed_sequence_indices`) confines
each token's attention to its own sample: sdpa, eager and flex_attention get a block-diagonal causal mask,
flash_attention_2 its variable-length kernel (one row per micro-batch, see `default_pack_length`). Rotary positions
restart with the positions, so every sample sees what it would see alone in a padded row.

The loss is the padded batch's: the first label of every sample is dropped (in a padded row it is never a
target either, and here it would be predicted from the previous sample's last token), padding is never learned,
and the image rows follow the samples' order in the rows, so `merge_image_features` writes each image onto its own
sample's placeholders. Which samples form a micro-batch does not change (see `sampler.balance_micro_batches` for
the order the trainer gives them), so accumulation, resume and the processes' exact token-weighted loss are as
without packing. How long a row may be depends on the attention: see `default_pack_length`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minigpt4qwen.data.collate import bookkeeping
from minigpt4qwen.text.conversation import IGNORE_INDEX


def default_pack_length(attn_implementation: str, max_txt_len: int) -> int:
    """`data.pack_length` where the config leaves it unset.

    Flash-attention (any variant; transformers finds the samples in `position_ids` only within a single row) and
    flex_attention (its block mask skips the pairs of tokens from different samples) take a micro-batch as one row:
    0. sdpa and eager attend through a dense [rows, 1, length, length] mask, so a row costs length^2 whatever it
    holds: rows of 2 x max_txt_len keep that near a padded batch's cost while leaving little of a row empty.
    """
    if "flash" in attn_implementation or attn_implementation == "flex_attention":
        return 0
    return 2 * max_txt_len


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of at most `capacity` tokens (0: one row).

    Deterministic: longer samples are placed first (ties in index order), each into the first row with room; a
    row keeps its samples in placement order.

    Args:
        lengths: the samples' token counts.
        capacity: the longest row; 0 puts every sample into a single row.

    Raises:
        ValueError: a sample longer than `capacity`.
    """
    if not capacity:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit data.pack_length = {capacity}; set "
                             "pack_length >= data.max_txt_len")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


class PackingCollator:
    """Collate `ConversationDataset` items into packed rows (the padding-free counterpart of `DataCollator`).

    The batch: `input_ids`, `labels`, `position_ids` (LongTensor [R, T]: R rows from `pack_rows`, T the longest
    row rounded up to `pad_to_multiple_of`; each sample's positions run 0..n-1 and its first label is
    IGNORE_INDEX; a row's tail of padding has the pad id, IGNORE_INDEX labels and positions restarting at 0, so
    it is a sample of its own that nothing attends to), `pixel_values` (float [N, 3, S, S], the images in the
    order their samples lie in the rows), and as `DataCollator`: `num_images` (per sample, in the given order),
    `num_label_tokens`, `events`, `problems`. No `attention_mask`: with one, transformers would not look for
    the samples' boundaries in `position_ids`.

    Args:
        pad_token_id: the id written into padding.
        pack_length: the longest row (`data.pack_length`); 0: one row per batch.
        pad_to_multiple_of: round the row length up to a multiple of this.

    Raises:
        ValueError: pad_to_multiple_of < 1 or pack_length < 0.
    """

    def __init__(self, pad_token_id: int, pack_length: int = 0, pad_to_multiple_of: int = 1) -> None:
        if pad_to_multiple_of < 1 or pack_length < 0:
            raise ValueError(f"need pad_to_multiple_of >= 1 and pack_length >= 0, got {pad_to_multiple_of}, "
                             f"{pack_length}")
        self.pad_token_id, self.pack_length, self.pad_to_multiple_of = pad_token_id, pack_length, pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict:
        """Collate a list of items.

        Args:
            samples: dataset items (at least one).

        Returns:
            The batch dict described in the class docstring.

        Raises:
            ValueError: an empty list, items whose input_ids and labels differ in length, or an item longer
                than pack_length.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        lengths = [len(s["input_ids"]) for s in samples]
        for k, sample in enumerate(samples):
            if len(sample["labels"]) != lengths[k]:
                raise ValueError(f"sample {k}: {lengths[k]} input_ids but {len(sample['labels'])} labels")
        rows = pack_rows(lengths, self.pack_length)
        longest = max(sum(lengths[i] for i in row) for row in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                end = start + lengths[i]
                input_ids[r, start:end] = samples[i]["input_ids"]
                labels[r, start:end] = samples[i]["labels"]
                labels[r, start] = IGNORE_INDEX
                position_ids[r, start:end] = torch.arange(lengths[i])
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "pixel_values": torch.cat([samples[i]["pixel_values"] for row in rows for i in row]),
            **bookkeeping(samples, labels),
        }
