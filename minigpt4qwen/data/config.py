"""Configuration of the training data: which annotation files, how to tokenize, truncate, batch and sample.

Plain dataclasses whose fields use only types omegaconf structured configs accept, so the YAML loader in
`minigpt4qwen.config` can build and override them; `validate()` checks the values omegaconf cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

FORMATS = ("minigpt4qwen", "llava", "cc_sbu_align", "text")
LABEL_MODES = ("assistant", "original")
CHAT_FORMATS = ("chatml", "template")
TRUNCATION_POLICIES = ("shorten", "drop")
BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass
class DatasetSpec:
    """One annotation file and where its images live."""

    # "minigpt4qwen" (the original's instruction/output JSON), "llava" (conversations), "cc_sbu_align"
    # (MiniGPT-4's filter_cap.json) or "text" (text-only {"messages": [...]} records).
    format: str = "minigpt4qwen"
    # A .json file (a list, or cc_sbu_align's {"annotations": [...]}) or a .jsonl file (one record per line).
    annotation: str = ""
    # Folder that relative image paths in the records are resolved against; unused by "text".
    image_root: str = ""
    # Records of this file per epoch, relative to its size: 2.0 repeats every record twice, 0.5 takes half of
    # them. A fractional part is drawn once per run, from the run's seed: every epoch (and a resumed run) sees the
    # same subset, not a fresh draw; the sampler and resuming rely on that fixed index.
    weight: float = 1.0


@dataclass
class DataConfig:
    """Everything the data layer needs besides the tokenizer and the model's image-token layout."""

    # The annotation files mixed into one training set.
    datasets: list[DatasetSpec] = field(default_factory=list)
    val_datasets: list[DatasetSpec] = field(default_factory=list)  # validation loss every train.eval_every steps
    # Side of the square images given to the vision tower, in pixels.
    image_size: int = 224
    # RandomResizedCrop's area range for training images (the original's min_scale / max_scale).
    min_scale: float = 0.5
    max_scale: float = 1.0
    # Longest sample in tokens, system prompt and image placeholder runs included (the original's max_txt_len).
    max_txt_len: int = 256
    # "chatml": the original's ChatML layout (Qwen-7B/14B-Chat); "template": the tokenizer's chat template
    # (Qwen2/2.5/3 and other LLMs), which supports label_mode "assistant" only.
    chat_format: str = "chatml"
    # "assistant": only assistant replies (and their end token) are learned; "original": the original
    # MiniGPT4Qwen's labels token for token (ChatML structure tokens of every turn are learned too).
    label_mode: str = "assistant"
    # The system turn written before every conversation that has none.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Over-long samples: "shorten" drops the oldest image-free history turns, then cuts the last answer's tail
    # (never an image run, never the whole answer), and drops what still does not fit; "drop" drops them all.
    truncation: str = "shorten"
    # A malformed record or an unreadable image: "error" stops with a message naming file and record; "skip"
    # leaves it out and counts it.
    bad_sample_policy: str = "error"
    # Shuffle within groups of similar length so that batches pad little.
    group_by_length: bool = False
    # Pad each batch to a multiple of this (1: exactly the longest sample; 8 suits tensor cores).
    pad_to_multiple_of: int = 1
    # Padding-free batches (data/packing.py): each micro-batch's samples laid end to end, positions restarting
    # per sample and attention confined to it; the same samples, loss and gradients as padded batches.
    packing: bool = False
    # Longest packed row in tokens (>= max_txt_len); 0: the whole micro-batch in one row. Unset: chosen by
    # model.attn_implementation (data/packing.py `default_pack_length`): one row for flash-attention and
    # flex_attention, which skip the pairs of tokens from different samples; rows of 2 x max_txt_len for sdpa and
    # eager, whose document mask is dense (rows x length^2 work).
    pack_length: Optional[int] = None
    # DataLoader worker processes (also the image-reading threads of `check_dataset`).
    num_workers: int = 4

    def validate(self) -> None:
        """Check the values that types alone do not constrain.

        Raises:
            ValueError: naming the first field whose value is not allowed.
        """
        choices = {
            "chat_format": CHAT_FORMATS,
            "label_mode": LABEL_MODES,
            "truncation": TRUNCATION_POLICIES,
            "bad_sample_policy": BAD_SAMPLE_POLICIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        if self.chat_format == "template" and self.label_mode != "assistant":
            raise ValueError("data.label_mode 'original' reproduces the original ChatML layout: with "
                             "data.chat_format=template set data.label_mode=assistant (or use data.chat_format=chatml)")
        if not self.datasets:
            raise ValueError("data.datasets is empty: list at least one annotation file")
        for section, specs in (("datasets", self.datasets), ("val_datasets", self.val_datasets)):
            for i, spec in enumerate(specs):
                if spec.format not in FORMATS:
                    raise ValueError(f"data.{section}[{i}].format = {spec.format!r}: expected one of {FORMATS}")
                if not spec.annotation:
                    raise ValueError(f"data.{section}[{i}].annotation is empty: give the annotation file")
                if not spec.weight > 0:
                    raise ValueError(f"data.{section}[{i}].weight = {spec.weight}: must be > 0")
        if self.image_size < 1 or self.max_txt_len < 1 or self.pad_to_multiple_of < 1 or self.num_workers < 0:
            raise ValueError("data.image_size, max_txt_len and pad_to_multiple_of must be >= 1, num_workers >= 0")
        if self.pack_length is not None and self.pack_length < 0:
            raise ValueError(f"data.pack_length = {self.pack_length}: must be >= 0 (0: one row per micro-batch)")
        if self.pack_length and self.pack_length < self.max_txt_len:
            raise ValueError(f"data.pack_length = {self.pack_length} is below data.max_txt_len = {self.max_txt_len}: a "
                             "sample must fit a packed row (0 packs each micro-batch into one row)")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"data.min_scale/max_scale = {self.min_scale}/{self.max_scale}: need 0 < min <= max <= 1")
