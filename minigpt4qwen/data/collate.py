"""Batching: pad to the batch's longest sample (not to max_txt_len), concatenate images in placeholder order.

The batch carries the model's inputs plus what the trainer needs to normalise the loss and to report data
problems: images per sample, the number of learned tokens, and the counts of truncated/dropped/skipped samples.
With `data.packing` the samples are laid end to end instead of padded (`minigpt4qwen.data.packing`).
"""

from __future__ import annotations

from collections import Counter

import torch

from minigpt4qwen.text.conversation import IGNORE_INDEX

# The keys `MiniGPT4Qwen.forward` takes; the others are bookkeeping.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


class DataCollator:
    """Collate `ConversationDataset` items into a batch dict.

    The batch: `input_ids`, `attention_mask`, `labels` (LongTensor [B, T], T = longest sample rounded up to
    `pad_to_multiple_of`; padding has the pad id, mask 0 and label IGNORE_INDEX), `pixel_values` (float
    [N, 3, S, S], every image of the batch, sample by sample in placeholder order; N may be 0),
    `num_images` (LongTensor [B]), `num_label_tokens` (LongTensor scalar: the targets the loss counts, i.e.
    labels[:, 1:] != IGNORE_INDEX), `events` (dict name -> count over the batch's items) and `problems`
    (one message per event, naming file and record: samples truncated, dropped or skipped while building it).

    Args:
        pad_token_id: the id written into padding (never attended to nor learned).
        pad_to_multiple_of: round the batch length up to a multiple of this.
        padding_side: "right" for training; "left" for batched generation.

    Raises:
        ValueError: padding_side is neither "right" nor "left", or pad_to_multiple_of < 1.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id, self.pad_to_multiple_of, self.padding_side = pad_token_id, pad_to_multiple_of, padding_side

    def __call__(self, samples: list[dict]) -> dict:
        """Collate a list of items.

        Args:
            samples: dataset items (at least one).

        Returns:
            The batch dict described in the class docstring.

        Raises:
            ValueError: an empty list, or items whose input_ids and labels differ in length.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        longest = max(len(s["input_ids"]) for s in samples)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            if len(sample["labels"]) != n:
                raise ValueError(f"sample {row}: {n} input_ids but {len(sample['labels'])} labels")
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, cols] = sample["input_ids"]
            labels[row, cols] = sample["labels"]
            attention_mask[row, cols] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            **bookkeeping(samples, labels),
        }


def bookkeeping(samples: list[dict], labels: torch.Tensor) -> dict:
    """The batch entries besides the model inputs: `num_images` (LongTensor [len(samples)], in sample order),
    `num_label_tokens` (targets the loss counts: labels[:, 1:] != IGNORE_INDEX), `events` and `problems`.

    Args:
        samples: the dataset items of the batch.
        labels: the batch's collated labels.
    """
    events: Counter[str] = Counter()
    for sample in samples:
        events.update(sample.get("events", ()))
    return {
        "num_images": torch.tensor([len(s["pixel_values"]) for s in samples], dtype=torch.long),
        "num_label_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
        "events": dict(events),
        "problems": [p for s in samples for p in s.get("problems", ())],
    }
