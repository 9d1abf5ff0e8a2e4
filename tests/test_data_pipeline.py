"""Samples as the model gets them: golden Qwen ids/labels, both label modes, truncation, batching, bad data, workers.

The golden tests write the original MiniGPT4Qwen `preprocess` rules out plainly (we cannot run its Qwen remote
code here) and compare our data layer's output with them token for token.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.data.formats import IMAGE_WRAP, DataError
from minigpt4qwen.data.images import CLIP_MEAN, CLIP_STD, ImageLoadError, ImageTransform, load_image, to_rgb
from minigpt4qwen.text.qwen_tokenizer import load_tokenizer
from minigpt4qwen.text.tiny_tokenizer import build_tiny_chat_tokenizer
from tests.reference import QWEN7B_DIR

IM_START, IM_END, NL, PLACEHOLDER = 151644, 151645, 198, 151646  # Qwen's <|im_start|>, <|im_end|>, "\n", <|extra_0|>
IGNORE = -100
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN7B_DIR)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_chat_tokenizer(["What color is it? It is red green blue white and the story goes on 猫"])


def make_images(root: Path) -> None:
    for name, color in COLORS.items():
        image = Image.new("RGB", (48, 36), color)
        ImageDraw.Draw(image).rectangle((4, 4, 12, 12), fill=(128, 128, 128))  # not flat: crops differ
        image.save(root / f"{name}.png")


def dataset(tmp_path, records, tokenizer, fmt="minigpt4qwen", **overrides) -> ConversationDataset:
    annotation = tmp_path / f"{fmt}.json"
    annotation.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    config = DataConfig(datasets=[DatasetSpec(fmt, str(annotation), str(tmp_path))], image_size=16, **overrides)
    image_token_id = PLACEHOLDER if tokenizer.vocab_size > 1000 else 3
    return ConversationDataset(
        config,
        tokenizer,
        image_token_id=image_token_id,
        num_query_tokens=32 if image_token_id == PLACEHOLDER else 4,
        train=False,
    )


def original_preprocess(tok, turns, image_len=32, system="You are a helpful assistant."):
    """The original `MiniGPT4Qwen.preprocess`, written out for one conversation of (role, content) turns.

    Its tokenizer encoded "<|extra_0|>" * image_len inside content as special ids, splitting the text around
    them (tiktoken, allowed_special="all"), so each `<ImageHere>` contributes image_len placeholder ids and the
    text pieces around it are encoded separately. tok("<|im_start|>user") is [im_start] + tok("user").
    """
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    ids = [IM_START] + enc("system") + [NL] + enc(system) + [IM_END, NL]
    labels = [IM_START] + [IGNORE] * (len(ids) - 3) + [IM_END, NL]
    for role, content in turns:
        pieces = content.split("<ImageHere>")
        body = enc(pieces[0])
        for piece in pieces[1:]:
            body += [PLACEHOLDER] * image_len + enc(piece)
        turn = [IM_START] + enc(role) + [NL] + body + [IM_END, NL]
        ids += turn
        if role == "user":  # [im_start] + [IGNORE] * (len - 3) + [im_end] + nl
            labels += [IM_START] + [IGNORE] * (len(turn) - 3) + [IM_END, NL]
        else:  # [im_start] + [IGNORE] * len(tok("<|im_start|>assistant")) + content + [im_end] + nl
            labels += [IM_START] + [IGNORE] * 2 + turn[3:-2] + [IM_END, NL]
    return ids, labels


SINGLE = {"image": "red.png", "instruction": f"{IMAGE_WRAP} What is in the image?", "output": "A cat."}
MULTI_ZH = {
    "image": "red.png",
    "instruction": [f"{IMAGE_WRAP} 图中有什么？", "What color is it?", "它在做什么？"],
    "output": ["一只猫。", "It is orange.", "它在睡觉，看起来很舒服。"],
}
MULTI_IMAGE = {
    "image": ["red.png", "blue.png"],
    "instruction": f"{IMAGE_WRAP} and {IMAGE_WRAP}: 描述一下这两张图。",
    "output": "A red image and a blue one.",
}


def test_original_mode_single_turn_literal_ids(tmp_path, qwen):
    make_images(tmp_path)
    sample = dataset(tmp_path, [SINGLE], qwen, label_mode="original")[0]
    # system turn: <|im_start|> system \n "You are a helpful assistant." <|im_end|> \n
    system = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]
    # user turn: <|im_start|> user \n "<Img>" 32 x placeholder "</Img> What is in the image?" <|im_end|> \n
    user_text = [522, 13033, 29, 3555, 374, 304, 279, 2168, 30]  # "</Img> What is in the image?"
    user = [IM_START, 872, NL, 27, 13033, 29] + [PLACEHOLDER] * 32 + user_text + [IM_END, NL]
    # assistant turn: <|im_start|> assistant \n "A cat." <|im_end|> \n
    reply = [IM_START, 77091, NL, 32, 8251, 13, IM_END, NL]
    assert sample["input_ids"].tolist() == system + user + reply
    # Learned: each turn's <|im_start|>, <|im_end|> and final "\n"; the answer; never role names or placeholders.
    expected = [IM_START] + [IGNORE] * 8 + [IM_END, NL] + [IM_START] + [IGNORE] * 46 + [IM_END, NL]
    expected += [IM_START, IGNORE, IGNORE, 32, 8251, 13, IM_END, NL]
    assert sample["labels"].tolist() == expected
    assert sample["pixel_values"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("record", [SINGLE, MULTI_ZH, MULTI_IMAGE], ids=["single", "multi_turn_zh", "multi_image"])
def test_original_mode_matches_original_preprocess(tmp_path, qwen, record):
    make_images(tmp_path)
    sample = dataset(tmp_path, [record], qwen, label_mode="original", max_txt_len=512)[0]
    questions, answers = record["instruction"], record["output"]
    if isinstance(questions, str):
        questions, answers = [questions], [answers]
    turns = [t for q, a in zip(questions, answers, strict=True) for t in (("user", q), ("assistant", a))]
    ids, labels = original_preprocess(qwen, turns)
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels


@pytest.mark.parametrize("record", [SINGLE, MULTI_ZH, MULTI_IMAGE], ids=["single", "multi_turn_zh", "multi_image"])
def test_assistant_mode_learns_replies_only_and_differs_where_documented(tmp_path, qwen, record):
    make_images(tmp_path)
    original = dataset(tmp_path, [record], qwen, label_mode="original", max_txt_len=512)[0]
    assistant = dataset(tmp_path, [record], qwen, max_txt_len=512)[0]
    ids = assistant["input_ids"].tolist()
    assert ids == original["input_ids"].tolist()
    labels, orig_labels = assistant["labels"].tolist(), original["labels"].tolist()
    answers = record["output"] if isinstance(record["output"], list) else [record["output"]]
    learned = qwen.decode([t for t in labels if t != IGNORE])
    assert learned == "".join(f"{a}<|im_end|>" for a in answers)
    # The only difference: "original" also learns every turn's <|im_start|>, the system/user <|im_end|> and
    # the "\n" after each <|im_end|>; placeholders are never learned.
    for i, (a, o) in enumerate(zip(labels, orig_labels, strict=True)):
        if a != o:
            assert a == IGNORE and (ids[i] == IM_START or ids[i] == IM_END or (ids[i] == NL and ids[i - 1] == IM_END))
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == PLACEHOLDER)


def test_template_mode_equals_chatml_for_a_chatml_template(tmp_path, tiny):
    records = [
        {"image": "red.png", "instruction": [f"{IMAGE_WRAP} What color is it?", "and?"], "output": ["red", "on"]}
    ]
    chatml = dataset(tmp_path, records, tiny).encode(0)
    template = dataset(tmp_path, records, tiny, chat_format="template").encode(0)
    assert (template.input_ids, template.labels, template.image_spans) == (
        chatml.input_ids,
        chatml.labels,
        chatml.image_spans,
    )


def test_collate_pads_to_longest_and_keeps_placeholder_order(tmp_path, tiny):
    make_images(tmp_path)
    records = [
        {"image": ["green.png", "blue.png"], "instruction": f"{IMAGE_WRAP} and {IMAGE_WRAP} color?", "output": "green"},
        {"instruction": "What color is it?", "output": "It is white and the story goes on and on"},
        {"image": "red.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": "red"},
    ]
    ds = dataset(tmp_path, records, tiny)
    samples = [ds[i] for i in range(3)]
    batch = DataCollator(tiny.pad_token_id)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (3, longest)
    assert DataCollator(tiny.pad_token_id, pad_to_multiple_of=8)(samples)["input_ids"].shape[1] == -(-longest // 8) * 8
    mask, labels, ids = batch["attention_mask"].bool(), batch["labels"], batch["input_ids"]
    assert mask.sum(1).tolist() == [len(s["input_ids"]) for s in samples]
    assert (labels[~mask] == IGNORE).all() and (ids[~mask] == tiny.pad_token_id).all()
    assert (labels[ids == 3] == IGNORE).all()
    assert batch["num_images"].tolist() == [2, 0, 1]
    assert ds.lengths == [len(s["input_ids"]) for s in samples]  # the estimate is exact here (nothing cut)
    assert batch["num_label_tokens"].item() == (labels[:, 1:] != IGNORE).sum().item() > 0
    # Image k of the batch is the k-th placeholder run's picture: green, blue, red (eval transform: the mean
    # colour survives; the grey square only darkens it).
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    rgb = (batch["pixel_values"] * std + mean).mean(dim=(2, 3))
    assert rgb.argmax(dim=1).tolist() == [1, 2, 0]


def test_truncation_drops_history_then_cuts_the_answer_never_an_image_run(tmp_path, tiny):
    make_images(tmp_path)
    story = " ".join(["the story goes on"] * 10)
    records = [
        {
            "image": "red.png",
            "instruction": [f"{IMAGE_WRAP} What color is it?", "What color is it?", "and green?"],
            "output": ["red", story, "green"],
        },  # the image turn stays; the long middle turn goes
        {"image": "blue.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": story},  # answer cut
        {"image": "blue.png", "instruction": f"{IMAGE_WRAP} {story}", "output": "blue"},  # cannot fit: dropped
    ]
    ds = dataset(tmp_path, records, tiny, max_txt_len=70)
    first, second = ds.encode(0), ds.encode(1)
    assert first.events == ("truncated_history",) and len(first.input_ids) <= 70
    assert tiny.decode(first.input_ids).count("story") == 0 and first.input_ids.count(3) == 4
    assert second.events == ("truncated_answer",) and len(second.input_ids) == 70
    assert ds[1]["events"] == ["truncated_answer"] and "record 1: truncated_answer: " in ds[1]["problems"][0]
    for enc in (first, second):
        ((start, end),) = enc.image_spans
        assert enc.input_ids[start:end] == [3] * 4 and end <= len(enc.input_ids)
        assert any(label != IGNORE for label in enc.labels[1:])
    with pytest.raises(DataError, match="record 2: too_long"):
        ds.encode(2)
    item = ds[2]  # replaced by the next sample (wrapping around), the drop counted and explained
    assert item["events"].count("dropped_too_long") == 1 and "record 2: too_long" in item["problems"][0]
    assert item["input_ids"].tolist() == ds[0]["input_ids"].tolist()
    strict = dataset(tmp_path, records[1:2], tiny, max_txt_len=70, truncation="drop")
    with pytest.raises(DataError, match="too_long"):
        strict.encode(0)


def test_bad_image_raises_naming_file_and_record_or_is_skipped_and_counted(tmp_path, tiny, monkeypatch):
    make_images(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = [
        {"image": "red.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": "red"},
        {"image": "corrupt.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": "red"},
    ]
    with pytest.raises(DataError, match=r"minigpt4qwen\.json: record 1: corrupt_image: .*corrupt\.png"):
        dataset(tmp_path, records, tiny)[1]
    skipping = dataset(tmp_path, records, tiny, bad_sample_policy="skip")
    assert skipping[1]["events"] == ["skipped_corrupt_image"] and skipping.counts["skipped_corrupt_image"] == 1
    with pytest.raises(ImageLoadError, match="missing_image: .*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    # Files that cannot be opened are not corrupt: the reason is given instead.
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageLoadError, match="missing_image: .*folder.png: a directory, not an image file"):
        load_image(str(tmp_path / "folder.png"))
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "denied", path)

    with monkeypatch.context() as patch:  # chmod 000 does not stop root (the tests may run as root): refuse the open
        patch.setattr("PIL.Image.builtins.open", refuse)
        with pytest.raises(ImageLoadError, match="missing_image: .*red.png: unreadable: permission denied"):
            load_image(str(tmp_path / "red.png"))


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    rgb = np.asarray(load_image(str(tmp_path / "grey16.png")))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 100, 156, 255] and (rgb == rgb[..., :1]).all()
    wide = Image.fromarray(values.astype(np.int32))  # mode "I": how older Pillow opens 16-bit PNGs
    assert wide.mode == "I" and np.asarray(to_rgb(wide))[0, :, 1].tolist() == [0, 100, 156, 255]


def test_empty_instruction_stops_construction_or_is_skipped_and_counted(tmp_path, tiny):
    records = [{"instruction": "What color is it?", "output": "red"}, {"instruction": "  ", "output": "blue"}]
    with pytest.raises(DataError, match=r"minigpt4qwen\.json: record 1: empty_instruction: turn 0"):
        dataset(tmp_path, records, tiny)
    ds = dataset(tmp_path, records, tiny, bad_sample_policy="skip")
    assert len(ds) == 1 and ds.counts == {"skipped_empty_instruction": 1} and ds.load_problems[0].index == 1


def test_malformed_annotation_stops_construction_or_is_counted(tmp_path, tiny):
    records = [{"instruction": "q", "output": "x"}, {"instruction": ["a", "b"], "output": ["x"]}]
    with pytest.raises(DataError, match=r"minigpt4qwen\.json: record 1: malformed_record"):
        dataset(tmp_path, records, tiny)
    ds = dataset(tmp_path, records, tiny, bad_sample_policy="skip")
    assert len(ds) == 1 and ds.counts == {"skipped_malformed_record": 1}
    assert ds.load_problems[0].index == 1


def test_dataloader_with_workers_over_mixed_formats_completes_an_epoch(tmp_path, tiny):
    make_images(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    own = [
        {"image": "red.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": "red"},
        {"image": ["green.png", "blue.png"], "instruction": f"{IMAGE_WRAP} {IMAGE_WRAP} color?", "output": "green"},
        {"image": "corrupt.png", "instruction": f"{IMAGE_WRAP} What color is it?", "output": "red"},
        {"instruction": "What color is it?", "output": "white"},
    ]
    llava = [
        {
            "image": "white.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "white"},
            ],
        },
        {"conversations": [{"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "blue"}]},
    ]
    (tmp_path / "own.json").write_text(json.dumps(own))
    (tmp_path / "llava.jsonl").write_text("\n".join(map(json.dumps, llava)))
    config = DataConfig(
        datasets=[
            DatasetSpec("minigpt4qwen", str(tmp_path / "own.json"), str(tmp_path)),
            DatasetSpec("llava", str(tmp_path / "llava.jsonl"), str(tmp_path), weight=1.5),
        ],
        image_size=16,
        bad_sample_policy="skip",
    )
    ds = ConversationDataset(config, tiny, image_token_id=3, num_query_tokens=4, seed=1)
    assert len(ds) == 4 + 3  # llava: 2 records x 1.5
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=DataCollator(tiny.pad_token_id))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == len(ds)
    assert sum(b["events"].get("skipped_corrupt_image", 0) for b in batches) == 1
    for b in batches:
        assert b["pixel_values"].shape[0] == b["num_images"].sum() == (b["input_ids"] == 3).sum() // 4


def test_item_augmentation_is_reproducible_per_seed_epoch_and_index(tmp_path):
    make_images(tmp_path)
    ds = dataset(tmp_path, [SINGLE], build_tiny_chat_tokenizer([]), max_txt_len=64)
    ds.transform = ImageTransform(16, train=True)
    first, again = ds[0]["pixel_values"], ds[0]["pixel_values"]
    epochs = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        epochs.append(ds[0]["pixel_values"])
    assert torch.equal(first, again) and any(not torch.equal(first, e) for e in epochs)

