"""The training dataset: mixed annotation files -> tokenized, masked, length-fitted samples with their images.

Tokenization and label masking happen here in one pass (`encode_conversation`), never in the model. Over-long
samples are shortened without cutting an image run or the whole answer, or dropped; bad records and images stop
the run or are skipped, per the config. Every such event is counted and travels with the sample, so the counts
survive DataLoader worker processes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.config import DataConfig
from minigpt4qwen.data.formats import Conversation, DataError, read_annotations
from minigpt4qwen.data.images import ImageLoadError, ImageTransform, load_image
from minigpt4qwen.text.conversation import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    RenderedConversation,
    render_chatml,
    render_with_template,
)

# A failing sample is replaced by the next one; this many failures in a row means the data is broken.
MAX_CONSECUTIVE_FAILURES = 64
# ChatML tokens around each turn's content: <|im_start|> role \n ... <|im_end|> \n (for length estimates).
_TURN_OVERHEAD = 5
_LENGTH_CHUNK = 4096


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation as model inputs, fitted to the length limit.

    Attributes:
        input_ids: token ids, image placeholder runs included.
        labels: aligned with input_ids (unshifted), IGNORE_INDEX where nothing is learned.
        image_spans: [start, end) of each placeholder run.
        images: the image paths, one per run, in order.
        events: what fitting did: "truncated_history" and/or "truncated_answer".
        full_length: the length before fitting.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    images: tuple[str, ...]
    events: tuple[str, ...]
    full_length: int


def encode_conversation(
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    *,
    image_token_id: int,
    num_query_tokens: int,
) -> EncodedConversation:
    """Tokenize and mask a conversation, then fit it into `config.max_txt_len` tokens.

    With truncation "shorten", the oldest history turn pairs whose question holds no image are dropped one by
    one; if still too long, the last answer's tail is cut (its first token always stays, and image runs all come
    before it). Images are never dropped.

    Args:
        conversation: the sample.
        tokenizer: the LLM's tokenizer.
        config: chat format, label mode, system prompt, length limit and truncation policy.
        image_token_id: the placeholder id.
        num_query_tokens: placeholder ids per image.

    Returns:
        The fitted sample.

    Raises:
        DataError: kind "too_long" (cannot fit), "no_supervised_tokens", or "malformed_record" (text the
            renderer rejects, e.g. text that encodes to special tokens).
    """
    messages = conversation.as_messages()
    system = config.system_prompt or None

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> RenderedConversation:
        kwargs = dict(image_token_id=image_token_id, num_query_tokens=num_query_tokens, label_mode=config.label_mode)
        try:
            if config.chat_format == "chatml":
                return render_chatml(
                    tokenizer, msgs, system_prompt=system, add_generation_prompt=generation_prompt, **kwargs
                )
            if system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": system}, *msgs]
            return render_with_template(tokenizer, msgs, add_generation_prompt=generation_prompt, **kwargs)
        except (ValueError, TypeError) as err:
            raise DataError(conversation.file, conversation.index, "malformed_record", str(err)) from None

    def fail(kind: str, detail: str) -> DataError:
        return DataError(conversation.file, conversation.index, kind, detail)

    limit = config.max_txt_len
    rendered = render(messages)
    full_length = len(rendered.input_ids)
    events: list[str] = []
    if full_length > limit and config.truncation == "drop":
        raise fail("too_long", f"{full_length} tokens > max_txt_len {limit} (truncation: drop)")
    if full_length > limit:
        first = 1 if messages[0]["role"] == "system" else 0
        pair = first
        # History pairs are (user, assistant) at first, first+2, ...; the last pair is the one kept whole.
        while len(rendered.input_ids) > limit and pair < len(messages) - 2:
            if IMAGE_MARKER in messages[pair]["content"]:
                pair += 2
                continue
            messages = messages[:pair] + messages[pair + 2 :]
            rendered = render(messages)
            events.append("truncated_history")
    input_ids, labels = rendered.input_ids, rendered.labels
    if len(input_ids) > limit:
        answer_start = len(render(messages[:-1], generation_prompt=True).input_ids)
        first_target = next((i for i in range(answer_start, len(labels)) if labels[i] != IGNORE_INDEX), len(labels))
        if first_target >= limit or any(end > limit for _, end in rendered.image_spans):
            raise fail(
                "too_long",
                f"{full_length} tokens, and what must stay (system prompt, turns with images, last question, the "
                f"answer's first token) needs {first_target + 1} > max_txt_len {limit}",
            )
        input_ids, labels = input_ids[:limit], labels[:limit]
        events.append("truncated_answer")
    # The model predicts labels[1:] from the positions before them; labels[0] is never a target.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise fail("no_supervised_tokens", "no token of the sample would be learned")
    return EncodedConversation(
        input_ids, labels, rendered.image_spans, conversation.images, tuple(dict.fromkeys(events)), full_length
    )


class ConversationDataset(Dataset):
    """Map-style dataset over the config's annotation files, mixed by weight.

    Item i is a dict: `input_ids` and `labels` (LongTensor [T]), `pixel_values` (float [n, 3, S, S], n >= 0, in
    placeholder order), `events` (list of event names: one entry per sample that was dropped or skipped in its
    place, then this sample's truncations) and `problems` (one message per event, in the same order, naming the
    file and record). A failing item is replaced by the next index, so batches keep their size.

    Args:
        config: the data config (validated here).
        tokenizer: the LLM's tokenizer.
        image_token_id: the placeholder id.
        num_query_tokens: placeholder ids per image.
        train: training transforms (random crop + flip) or eval ones.
        seed: seeds weight subsampling (drawn once here: the same subset every epoch) and, with the epoch and
            index, each sample's augmentation.

    Raises:
        DataError: an unreadable annotation file; with bad_sample_policy "error", the first bad record.
        ValueError: an invalid config, or no usable record at all.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_token_id: int,
        num_query_tokens: int,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        config.validate()
        self.config, self.tokenizer = config, tokenizer
        self.image_token_id, self.num_query_tokens = image_token_id, num_query_tokens
        self.seed, self.epoch = seed, 0
        self.transform = ImageTransform(config.image_size, train=train, scale=(config.min_scale, config.max_scale))
        # Counts of this process: records skipped at load time, plus item events when items are read here.
        self.counts: Counter[str] = Counter()
        self.load_problems: list[DataError] = []
        self.records: list[Conversation] = []
        parts = []
        for k, spec in enumerate(config.datasets):
            start = len(self.records)
            for item in read_annotations(spec):
                if isinstance(item, Conversation):
                    self.records.append(item)
                elif config.bad_sample_policy == "error":
                    raise item
                else:
                    self.load_problems.append(item)
                    self.counts[f"skipped_{item.kind}"] += 1
            parts.append(_weighted_indices(start, len(self.records), spec.weight, np.random.default_rng([seed, k])))
        self.index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if len(self.index) == 0:
            raise ValueError(f"no usable record in {[spec.annotation for spec in config.datasets]}")
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations (call before creating the epoch's DataLoader iterator).

        Args:
            epoch: the epoch number. DataLoader workers copy the dataset when an iterator starts, so with
                `persistent_workers=True` they keep the epoch they started with.
        """
        self.epoch = epoch

    def conversation(self, i: int) -> Conversation:
        """The record behind item i."""
        return self.records[int(self.index[i])]

    @property
    def lengths(self) -> list[int]:
        """Estimated token length of each item, for length-grouped sampling.

        Text tokens + placeholder runs + ChatML framing, capped at max_txt_len; computed once, in batched
        tokenizer calls, without rendering or truncating.
        """
        if self._lengths is None:
            system = len(self.tokenizer(self.config.system_prompt, add_special_tokens=False)["input_ids"])
            per_record = []
            # Chunks bound the memory of the token lists (only their lengths are kept).
            for begin in range(0, len(self.records), _LENGTH_CHUNK):
                chunk = self.records[begin : begin + _LENGTH_CHUNK]
                texts = [c.replace(IMAGE_MARKER, "") for record in chunk for _, c in record.messages]
                counts = iter(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])
                for record in chunk:
                    text = sum(next(counts) for _ in record.messages)
                    framing = _TURN_OVERHEAD * (len(record.messages) + 1) + system
                    per_record.append(text + framing + len(record.images) * self.num_query_tokens)
            self._lengths = [min(per_record[r], self.config.max_txt_len) for r in self.index]
        return self._lengths

    def encode(self, i: int) -> EncodedConversation:
        """Text side of item i (no image is read).

        Raises:
            DataError: see `encode_conversation`.
        """
        layout = dict(image_token_id=self.image_token_id, num_query_tokens=self.num_query_tokens)
        return encode_conversation(self.conversation(i), self.tokenizer, self.config, **layout)

    def __getitem__(self, i: int) -> dict:
        events: list[str] = []
        problems: list[str] = []
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            j = (i + attempt) % len(self)
            try:
                sample = self._load(j)
            except DataError as err:
                dropped = err.kind in ("too_long", "no_supervised_tokens")
                if not dropped and self.config.bad_sample_policy == "error":
                    raise
                event = f"dropped_{err.kind}" if dropped else f"skipped_{err.kind}"
                events.append(event)
                problems.append(str(err))
                self.counts[event] += 1
                continue
            self.counts.update(sample["events"])
            sample["events"] = events + sample["events"]
            sample["problems"] = problems + sample["problems"]
            return sample
        raise RuntimeError(f"{MAX_CONSECUTIVE_FAILURES} consecutive samples from item {i} failed; last: {problems[-1]}")

    def _load(self, j: int) -> dict:
        """Item j without substitution: encoded text, transformed images, and a message per truncation."""
        encoded = self.encode(j)
        conv = self.conversation(j)
        over = f"{encoded.full_length} tokens > max_txt_len {self.config.max_txt_len}"
        cut = {"truncated_history": "oldest history turns left out", "truncated_answer": "the answer's tail cut"}
        notes = [f"{conv.file}: record {conv.index}: {event}: {over}, {cut[event]}" for event in encoded.events]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, j]).generate_state(1, dtype=np.uint64)[0] >> 1)
        generator = torch.Generator().manual_seed(seed)
        pixels = []
        for path in encoded.images:
            try:
                image = load_image(path)
            except ImageLoadError as err:
                raise DataError(conv.file, conv.index, err.kind, f"{err.path}: {err.detail}") from None
            pixels.append(self.transform(image, generator))
        size = self.config.image_size
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size),
            "events": list(encoded.events),
            "problems": notes,
        }


def _weighted_indices(start: int, stop: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Record ids start..stop-1 repeated floor(weight) times plus a random fraction of them, in file order.

    Called once per dataset: the fraction is fixed for the run (every epoch, and a resumed run, index the same
    items), which the sampler's epoch plans and resume offsets rely on.
    """
    ids = np.arange(start, stop, dtype=np.int64)
    whole, fraction = math.floor(weight), weight - math.floor(weight)
    extra = np.sort(rng.permutation(ids)[: round(fraction * len(ids))])
    return np.concatenate([np.tile(ids, whole), extra])
