"""Validation pass over the training data, before any GPU time is spent: every record, every image.

`check_dataset` reads each annotation file, parses, tokenizes and fits each record exactly as training will,
and decodes every image; it returns a report of each problem (file, record index, kind, detail) and summary
statistics (records, images, token-length percentiles, truncations, an optional length histogram).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.dataset import encode_conversation
from minigpt4qwen.data.formats import Conversation, DataError, read_annotations
from minigpt4qwen.data.images import ImageLoadError, load_image
from minigpt4qwen.text.conversation import IGNORE_INDEX

PERCENTILES = (50, 90, 99, 100)


@dataclass
class FileSummary:
    """Counts for one annotation file."""

    annotation: str
    format: str
    records: int = 0
    usable: int = 0
    images: int = 0
    text_only: int = 0  # usable records without an image


@dataclass
class DataCheckReport:
    """What `check_dataset` found.

    Attributes:
        problems: every problem, sorted by file and record index.
        files: per-file counts.
        max_txt_len: the limit samples were fitted to.
        total_tokens: per usable sample, its length before fitting (placeholders included).
        image_tokens: per usable sample, its placeholder tokens.
        label_tokens: per usable sample, its learned tokens after fitting.
        events: fitting counts ("truncated_history", "truncated_answer").
        trained_parts: the model parts the run trains, when known (for the text-only warning).
        validation: the same for `val_datasets`, when the config has any (its problems are not in `problems`).
    """

    problems: list[DataError] = field(default_factory=list)
    files: list[FileSummary] = field(default_factory=list)
    max_txt_len: int = 0
    total_tokens: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    trained_parts: tuple[str, ...] | None = None
    validation: DataCheckReport | None = None

    @property
    def ok(self) -> bool:
        """True when no record has a problem, validation records included (truncated samples are fine; dropped
        ones are problems)."""
        return not self.problems and (self.validation is None or self.validation.ok)

    def format(self, max_problems: int = 50) -> str:
        """A human-readable report: file table, token-length percentiles, fitting counts, problems; then the same
        for the validation datasets, under their own heading.

        Args:
            max_problems: problems listed per section (all are counted).

        Returns:
            The text, newline-separated.
        """
        lines = self._section(max_problems)
        if self.validation is not None:
            lines = ["training datasets (data.datasets):", *lines, "",
                     "validation datasets (data.val_datasets):", *self.validation._section(max_problems)]
        lines.append("OK" if self.ok else "NOT OK: fix the records above, or train with data.bad_sample_policy=skip")
        return "\n".join(lines)

    def _section(self, max_problems: int) -> list[str]:
        """The lines of `format` for this report's own files."""
        width = max([len(f.annotation) for f in self.files] + [4])
        lines = [f"{'file':<{width}}  {'format':<12} {'records':>8} {'usable':>8} {'images':>8} {'text-only':>9}"]
        for f in self.files:
            lines.append(f"{f.annotation:<{width}}  {f.format:<12} {f.records:>8} {f.usable:>8} {f.images:>8} "
                         f"{f.text_only:>9}")
        if warning := self.text_only_warning():
            lines += ["", warning]
        if self.total_tokens:
            text = [t - i for t, i in zip(self.total_tokens, self.image_tokens, strict=True)]
            lines += ["", f"tokens per sample (before fitting to max_txt_len={self.max_txt_len}):"]
            lines.append(f"{'':<16}" + "".join(f"{'max' if p == 100 else f'p{p}':>8}" for p in PERCENTILES))
            rows = [("total", self.total_tokens), ("text", text), ("image", self.image_tokens)]
            rows.append(("learned (fitted)", self.label_tokens))
            for name, values in rows:
                stats = np.percentile(np.asarray(values), PERCENTILES, method="nearest")
                lines.append(f"{name:<16}" + "".join(f"{int(v):>8}" for v in stats))
            # Samples that cannot be fitted are problems (too_long), absent from total_tokens: both kinds count.
            truncated = sum(t > self.max_txt_len for t in self.total_tokens)
            dropped = sum(p.kind == "too_long" for p in self.problems)
            lines.append(
                f"over max_txt_len: {truncated + dropped} ({truncated} truncated, {dropped} too_long, dropped); "
                f"truncated history: {self.events['truncated_history']}; "
                f"truncated answer: {self.events['truncated_answer']}"
            )
        kinds = Counter(p.kind for p in self.problems)
        lines += ["", f"problems: {len(self.problems)}" + "".join(f", {k} {n}" for k, n in sorted(kinds.items()))]
        lines += [f"  {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return lines

    def text_only_warning(self) -> str | None:
        """A warning when text-only records meet a run that trains only parts no text reaches (the image path).

        Such records still train nothing there: their tokens only enlarge each step's loss denominator, which
        shrinks the image samples' share of the gradient.
        """
        text_only = sum(f.text_only for f in self.files)
        if not text_only or self.trained_parts is None or "language_model" in self.trained_parts:
            return None
        usable = sum(f.usable for f in self.files)
        return (f"WARNING: {text_only} of {usable} usable records are text-only, but this run trains only "
                f"{', '.join(self.trained_parts) or 'nothing'}, which text cannot reach: those records teach it "
                "nothing and dilute each step's gradient. Remove them, or train the LLM too "
                "(model.trainable.language_model=true or train.lora.enabled=true).")

    def save_histogram(self, path: str, bins: int = 20) -> None:
        """Draw the distribution of sample lengths (before fitting) as a PNG bar chart, max_txt_len marked.

        Args:
            path: the output file.
            bins: number of bars.

        Raises:
            ValueError: there is no usable sample to plot.
        """
        if not self.total_tokens:
            raise ValueError("no usable sample: nothing to plot")
        counts, edges = np.histogram(self.total_tokens, bins=bins)
        width, height, margin = 640, 360, 40
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        plot_w, plot_h = width - 2 * margin, height - 2 * margin
        bar_w = plot_w / bins
        for k, count in enumerate(counts):
            top = height - margin - plot_h * count / counts.max()
            draw.rectangle((margin + k * bar_w, top, margin + (k + 1) * bar_w - 1, height - margin), fill="steelblue")
        span = max(edges[-1] - edges[0], 1)
        if edges[0] <= self.max_txt_len <= edges[-1]:
            x = margin + plot_w * (self.max_txt_len - edges[0]) / span
            draw.line((x, margin, x, height - margin), fill="red", width=2)
        draw.text((margin, 10), f"tokens per sample (n={len(self.total_tokens)}; red: max_txt_len)", fill="black")
        draw.text((margin, height - margin + 8), f"{int(edges[0])}", fill="black")
        draw.text((width - margin - 40, height - margin + 8), f"{int(edges[-1])}", fill="black")
        draw.text((4, margin), f"{counts.max()}", fill="black")
        image.save(path)


def _image_problem(path: str) -> ImageLoadError | None:
    """The load error of an image, or None when it decodes."""
    try:
        load_image(path)
    except ImageLoadError as err:
        return err
    return None


def check_dataset(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_token_id: int,
    num_query_tokens: int,
    open_images: bool = True,
    trained_parts: Sequence[str] | None = None,
) -> DataCheckReport:
    """Read, parse, tokenize and fit every record of the config's datasets and validation datasets, and decode
    every image.

    Args:
        config: the data config (validated here).
        tokenizer: the LLM's tokenizer.
        image_token_id: the placeholder id.
        num_query_tokens: placeholder ids per image.
        open_images: decode every image (on `config.num_workers` threads); False checks the text only.
        trained_parts: the parts the run trains ("language_model" where LoRA adapters train); given, the report
            warns when text-only records can reach none of them.

    Returns:
        The report of `config.datasets`, with that of `config.val_datasets` as its `validation` (None without
        any); `report.ok` is False when any record of either would fail, be skipped or be dropped.

    Raises:
        ValueError: an invalid config.
    """
    config.validate()
    layout = dict(image_token_id=image_token_id, num_query_tokens=num_query_tokens)
    report = DataCheckReport(max_txt_len=config.max_txt_len,
                             trained_parts=None if trained_parts is None else tuple(trained_parts))
    splits = [(report, _check_records(config.datasets, tokenizer, config, report, **layout))]
    if config.val_datasets:
        # Validation records train nothing, so the text-only warning does not apply to them (trained_parts None).
        report.validation = DataCheckReport(max_txt_len=config.max_txt_len)
        splits.append((report.validation, _check_records(config.val_datasets, tokenizer, config, report.validation,
                                                         **layout)))
    failures: dict[str, ImageLoadError] = {}
    if open_images:
        paths = list(dict.fromkeys(path for _, samples in splits for sample in samples for path in sample.conv.images))
        # Decoding releases the GIL, so threads overlap; each distinct file is decoded once, for both splits.
        with ThreadPoolExecutor(max_workers=max(1, config.num_workers)) as pool:
            failures = {path: err for path, err in zip(paths, pool.map(_image_problem, paths), strict=True) if err}
    for split, samples in splits:
        _add_samples(split, samples, failures)
        split.problems.sort(key=lambda p: (p.file, -1 if p.index is None else p.index, p.kind))
    return report


@dataclass
class _Sample:
    """A record that passed the text checks, with its statistics (counted once its images decode)."""

    summary: FileSummary
    conv: Conversation
    full_length: int
    image_tokens: int
    label_tokens: int
    events: tuple[str, ...]


def _check_records(
    specs: Sequence[DatasetSpec], tokenizer: PreTrainedTokenizerBase, config: DataConfig, report: DataCheckReport,
    *, image_token_id: int, num_query_tokens: int,
) -> list[_Sample]:
    """Parse, tokenize and fit every record of `specs`, adding file summaries and problems to `report`.

    Returns:
        The records that pass (their images not yet decoded).
    """
    samples: list[_Sample] = []
    for spec in specs:
        summary = FileSummary(spec.annotation, spec.format)
        report.files.append(summary)
        try:
            items = list(read_annotations(spec))
        except DataError as err:
            report.problems.append(err)
            continue
        summary.records = len(items)
        for item in items:
            if isinstance(item, DataError):
                report.problems.append(item)
                continue
            try:
                encoded = encode_conversation(
                    item, tokenizer, config, image_token_id=image_token_id, num_query_tokens=num_query_tokens
                )
            except DataError as err:
                report.problems.append(err)
                continue
            learned = sum(label != IGNORE_INDEX for label in encoded.labels[1:])
            image_tokens = len(item.images) * num_query_tokens
            samples.append(_Sample(summary, item, encoded.full_length, image_tokens, learned, encoded.events))
            summary.images += len(item.images)
    return samples


def _add_samples(report: DataCheckReport, samples: list[_Sample], failures: dict[str, ImageLoadError]) -> None:
    """Count the samples whose images all decode as usable, in the file summaries and token statistics; report
    each failing image once per record that uses it (training would skip or stop on that record)."""
    for sample in samples:
        conv = sample.conv
        failed = [(path, failures[path]) for path in dict.fromkeys(conv.images) if path in failures]
        for path, err in failed:
            report.problems.append(DataError(conv.file, conv.index, err.kind, f"{path}: {err.detail}"))
        if failed:
            continue
        sample.summary.usable += 1
        sample.summary.text_only += not conv.images
        report.total_tokens.append(sample.full_length)
        report.image_tokens.append(sample.image_tokens)
        report.label_tokens.append(sample.label_tokens)
        report.events.update(sample.events)
