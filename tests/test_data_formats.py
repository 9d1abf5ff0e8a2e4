"""Annotation readers (all four formats, .json and .jsonl) and the validation pass on crafted bad files."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from minigpt4qwen.data.check import check_dataset
from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.data.formats import CC_SBU_PROMPTS, IMAGE_WRAP, Conversation, DataError, read_annotations
from minigpt4qwen.text.tiny_tokenizer import build_tiny_chat_tokenizer

Q = f"{IMAGE_WRAP} What is it?"


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def read(fmt: str, annotation: str, image_root: str = "/imgs") -> list:
    return list(read_annotations(DatasetSpec(fmt, annotation, image_root)))


def test_minigpt4qwen_single_multi_turn_multi_image_and_text_only(tmp_path):
    records = [
        {"image": "a.jpg", "instruction": Q, "output": "A cat."},
        {"image": "b.jpg", "instruction": [Q, "颜色呢？"], "output": ["A dog.", "棕色。"]},
        {"image": ["a.jpg", "b.jpg"], "instruction": f"{IMAGE_WRAP} and {IMAGE_WRAP}?", "output": "Two."},
        {"instruction": "Hi", "output": "Hello."},
    ]
    single, multi, two, text = read("minigpt4qwen", write_json(tmp_path / "a.json", records))
    assert single == Conversation((("user", Q), ("assistant", "A cat.")), ("/imgs/a.jpg",), str(tmp_path / "a.json"), 0)
    assert [r for r, _ in multi.messages] == ["user", "assistant", "user", "assistant"]
    assert multi.messages[3] == ("assistant", "棕色。") and multi.index == 1
    assert two.images == ("/imgs/a.jpg", "/imgs/b.jpg")
    assert text.images == () and text.as_messages()[0] == {"role": "user", "content": "Hi"}


def test_llava_json_and_jsonl(tmp_path):
    record = {
        "image": "c.jpg",
        "conversations": [
            {"from": "gpt", "value": "an opening reply is skipped, as LLaVA and the original do"},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    (conv,) = read("llava", write_json(tmp_path / "l.json", [record]))
    assert conv.messages == (("user", f"{IMAGE_WRAP}\nWhat is it?"), ("assistant", "A cat."))
    # As LLaVA's preprocessing: a turn's lone <image> goes first, then a newline and the rest stripped; several
    # stay where they are.
    turns = [" What is this?\n<image> ", "<image>", "Left <image> or right <image>?"]
    moved = [{"image": ["c.jpg"] * q.count("<image>"), "conversations": [{"from": "human", "value": q},
                                                                        {"from": "gpt", "value": "A cat."}]}
             for q in turns]
    firsts = [c.messages[0][1] for c in read("llava", write_json(tmp_path / "m.json", moved))]
    assert firsts == [f"{IMAGE_WRAP}\nWhat is this?", IMAGE_WRAP, f"Left {IMAGE_WRAP} or right {IMAGE_WRAP}?"]
    lines = tmp_path / "l.jsonl"
    lines.write_text(json.dumps(record) + "\n\n" + json.dumps({"conversations": record["conversations"][1:]}) + "\n")
    first, second = read("llava", str(lines))
    assert (first.index, second.index) == (0, 2)  # jsonl indices are line indices; blank lines are skipped
    assert isinstance(second, DataError) and second.kind == "marker_mismatch"


def test_cc_sbu_align_and_text_formats(tmp_path):
    data = {"annotations": [{"image_id": "2", "caption": "A bird."}, {"image_id": 7, "caption": "A tree."}]}
    first, second = read("cc_sbu_align", write_json(tmp_path / "filter_cap.json", data), "/cc/image")
    assert first.messages == (("user", f"{IMAGE_WRAP} {CC_SBU_PROMPTS[0]}"), ("assistant", "A bird."))
    assert second.images == ("/cc/image/7.jpg",) and CC_SBU_PROMPTS[1] in second.messages[0][1]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    (text,) = read("text", write_json(tmp_path / "t.json", [{"messages": msgs}]))
    assert text.as_messages() == msgs and text.images == ()


BAD_RECORDS = [
    ("minigpt4qwen", ["not an object"], "malformed_record", "JSON object"),
    ("minigpt4qwen", {"image": "a.jpg", "output": "x"}, "malformed_record", "missing field 'instruction'"),
    ("minigpt4qwen", {"instruction": 3, "output": "x"}, "malformed_record", "'instruction' must be str or list"),
    ("minigpt4qwen", {"instruction": ["a", "b"], "output": ["x"]}, "malformed_record", "2 turns but 'output' has 1"),
    ("minigpt4qwen", {"instruction": ["a", 5], "output": ["x", "y"]}, "malformed_record", "instruction[1] must be str"),
    ("minigpt4qwen", {"image": "a.jpg", "instruction": "no marker", "output": "x"}, "marker_mismatch", "0 image"),
    ("minigpt4qwen", {"instruction": Q, "output": "x"}, "marker_mismatch", "1 image markers in the text but 0"),
    ("minigpt4qwen", {"instruction": "q", "output": "  "}, "empty_answer", "the answer is empty"),
    ("minigpt4qwen", {"instruction": " ", "output": "x"}, "empty_instruction", "turn 0: the instruction is empty"),
    ("minigpt4qwen", {"instruction": ["q", ""], "output": ["x", "y"]}, "empty_instruction", "turn 2: the instruc"),
    (
        "text",
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        "empty_instruction",
        "the instruction is empty",
    ),
    ("minigpt4qwen", {"video": "v.mp4", "instruction": "q", "output": "x"}, "malformed_record", "video"),
    (
        "llava",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "x"}]},
        "unknown_role",
        "'bot'",
    ),
    ("llava", {"conversations": [{"from": "human", "value": "q"}]}, "empty_answer", "ends with a user turn"),
    (
        "llava",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "x"}]},
        "malformed_record",
        "must alternate",
    ),
    (
        "text",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"{Q}"}]},
        "marker_mismatch",
        "only user turns",
    ),
    ("cc_sbu_align", {"image_id": "1"}, "malformed_record", "missing field 'caption'"),
]


@pytest.mark.parametrize("fmt, record, kind, words", BAD_RECORDS)
def test_bad_record_is_located_and_explained(tmp_path, fmt, record, kind, words):
    good = {"instruction": "q", "output": "x"} if fmt == "minigpt4qwen" else None
    records = [good, record] if good else [record]
    path = write_json(tmp_path / "bad.json", records if fmt != "cc_sbu_align" else {"annotations": records})
    err = read(fmt, path)[-1]
    assert isinstance(err, DataError), err
    assert (err.kind, err.index, err.file) == (kind, len(records) - 1, path)
    assert words in str(err) and f"{path}: record {len(records) - 1}: {kind}" in str(err)


def test_unreadable_files_raise_naming_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "q",')
    for path in (str(broken), str(tmp_path / "absent.json"), write_json(tmp_path / "obj.json", {"a": 1})):
        with pytest.raises(DataError, match="unreadable_file") as info:
            read("minigpt4qwen", path)
        assert info.value.file == path and info.value.index is None


def test_check_dataset_reports_every_problem_with_file_and_index(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    long_answer = " ".join(["word"] * 80)
    records = [
        {"image": "ok.png", "instruction": Q, "output": "A red square."},
        {"image": "missing.png", "instruction": Q, "output": "Gone."},
        {"image": "corrupt.jpg", "instruction": Q, "output": "Broken."},
        {"instruction": ["a", "b"], "output": ["x"]},
        {"image": "ok.png", "instruction": Q + long_answer, "output": "Too long to fit."},
        {"instruction": "Tell a long story.", "output": long_answer},
    ]
    annotation = write_json(tmp_path / "mix.json", records)
    bad_lines = tmp_path / "more.jsonl"
    bad_lines.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    config = DataConfig(
        datasets=[
            DatasetSpec("minigpt4qwen", annotation, str(tmp_path)),
            DatasetSpec("text", str(bad_lines)),
            DatasetSpec("llava", str(tmp_path / "absent.json")),
        ],
        max_txt_len=64,
        num_workers=2,
    )
    tok = build_tiny_chat_tokenizer([*map(json.dumps, records), "hi yo"])
    report = check_dataset(config, tok, image_token_id=3, num_query_tokens=4)
    found = {(Path(p.file).name, p.index, p.kind) for p in report.problems}
    assert found == {
        ("mix.json", 1, "missing_image"),
        ("mix.json", 2, "corrupt_image"),
        ("mix.json", 3, "malformed_record"),
        ("mix.json", 4, "too_long"),
        ("more.jsonl", 1, "malformed_record"),
        ("absent.json", None, "unreadable_file"),
    }
    assert not report.ok
    assert [(f.records, f.usable, f.images) for f in report.files] == [(6, 2, 3), (2, 1, 0), (0, 0, 0)]
    assert report.events["truncated_answer"] == 1  # the long story is cut, not dropped
    # Token statistics cover the 3 usable samples only, not records 1 and 2, whose images fail.
    assert len(report.total_tokens) == len(report.label_tokens) == 3 and report.image_tokens == [4, 0, 0]
    text = report.format()
    assert "missing.png" in text and f"{annotation}: record 2: corrupt_image" in text and "NOT OK" in text
    assert "p50" in text and "truncated answer: 1" in text
    report.save_histogram(str(tmp_path / "lengths.png"))
    assert Image.open(tmp_path / "lengths.png").size == (640, 360)
    records_ok = write_json(tmp_path / "ok.json", records[:1])
    clean = check_dataset(
        DataConfig(datasets=[DatasetSpec("minigpt4qwen", records_ok, str(tmp_path))]),
        tok,
        image_token_id=3,
        num_query_tokens=4,
    )
    assert clean.ok and clean.format().endswith("OK")


def test_check_counts_over_long_samples_as_its_too_long_lines_and_reports_empty_instructions(tmp_path):
    long = " ".join(["word"] * 80)
    records = [
        {"instruction": "Tell a long story.", "output": long},  # the answer is cut
        {"instruction": f"Again: {long}", "output": "No."},  # the question alone is too long: dropped
        {"instruction": ["Hi.", long], "output": ["Hi.", "x"]},  # dropped: the last question must stay
        {"instruction": "\n", "output": "An answer to nothing."},
    ]
    annotation = write_json(tmp_path / "text.json", records)
    tok = build_tiny_chat_tokenizer([*map(json.dumps, records)])
    config = DataConfig(datasets=[DatasetSpec("minigpt4qwen", annotation)], max_txt_len=64)
    report = check_dataset(config, tok, image_token_id=3, num_query_tokens=4)
    found = {(p.index, p.kind) for p in report.problems}
    assert found == {(1, "too_long"), (2, "too_long"), (3, "empty_instruction")}
    text = report.format()
    too_long_lines = [line for line in text.splitlines() if ": too_long: " in line]
    assert len(too_long_lines) == 2 and "too_long 2" in text
    assert "over max_txt_len: 3 (1 truncated, 2 too_long, dropped)" in text
    assert f"{annotation}: record 3: empty_instruction: turn 0: the instruction is empty" in text


def test_data_config_loads_through_omegaconf_and_validates():
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), {"datasets": [{"format": "llava", "annotation": "a.json", "image_root": "i"}]}
    )
    merged.merge_with_dotlist(["datasets.0.weight=2.5", "group_by_length=true", "label_mode=original"])
    config = OmegaConf.to_object(merged)
    config.validate()
    assert config.datasets[0] == DatasetSpec("llava", "a.json", "i", 2.5) and config.group_by_length
    for field, value in [("label_mode", "all"), ("truncation", "cut"), ("min_scale", 0.0), ("datasets", [])]:
        bad = DataConfig(datasets=[DatasetSpec("text", "t.json")])
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=field if field != "datasets" else "empty"):
            bad.validate()
    with pytest.raises(ValueError, match=r"datasets\[0\].format"):
        DataConfig(datasets=[DatasetSpec("coco", "t.json")]).validate()


def test_lone_surrogates_are_reported_at_load_and_never_reach_lengths(tmp_path):
    # JSON's "\ud800" escape decodes to a lone surrogate, which the tokenizer rejects with a bare TypeError.
    annotation = tmp_path / "own.json"
    annotation.write_text('[{"instruction": "What \\ud800 color", "output": "red"},\n'
                          ' {"instruction": "q", "output": "x"}]')
    tok = build_tiny_chat_tokenizer(["What color red q x"])
    config = DataConfig(datasets=[DatasetSpec("minigpt4qwen", str(annotation))], bad_sample_policy="skip")
    ds = ConversationDataset(config, tok, image_token_id=3, num_query_tokens=4)
    assert len(ds) == 1 and ds.counts == {"skipped_malformed_record": 1} and ds.load_problems[0].index == 0
    assert len(ds.lengths) == 1  # the trainer reads these for group_by_length and packing
    config.bad_sample_policy = "error"
    with pytest.raises(DataError, match=rf"{annotation}: record 0: malformed_record: message 0 \(user\)"):
        ConversationDataset(config, tok, image_token_id=3, num_query_tokens=4)
    text = tmp_path / "text.jsonl"
    text.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}')
    (err,) = read("text", str(text))
    assert (err.file, err.index, err.kind) == (str(text), 0, "malformed_record")
    assert "message 1 (assistant): the text is not valid Unicode: '\\udfff' at character 0" in str(err)


def test_check_dataset_checks_the_validation_datasets_under_their_own_heading(tmp_path):
    train = write_json(tmp_path / "train.json", [{"instruction": "q", "output": "x"}])
    val = write_json(tmp_path / "val.json", [{"instruction": "q", "output": "x"}, {"instruction": "q", "output": " "}])
    tok = build_tiny_chat_tokenizer(["q x"])
    config = DataConfig(datasets=[DatasetSpec("minigpt4qwen", train)], val_datasets=[DatasetSpec("minigpt4qwen", val)])
    report = check_dataset(config, tok, image_token_id=3, num_query_tokens=4)
    assert not report.ok and report.problems == [] and [f.annotation for f in report.files] == [train]
    assert [(p.file, p.index, p.kind) for p in report.validation.problems] == [(val, 1, "empty_answer")]
    assert [(f.annotation, f.records, f.usable) for f in report.validation.files] == [(val, 2, 1)]
    text = report.format()
    heading = text.index("validation datasets (data.val_datasets):")
    assert text.startswith("training datasets (data.datasets):") and text.index(train) < heading
    assert text.index(f"{val}: record 1: empty_answer") > heading and text.splitlines()[-1].startswith("NOT OK")
    assert check_dataset(DataConfig(datasets=config.datasets), tok, image_token_id=3, num_query_tokens=4).ok


def test_a_fractional_weight_draws_its_subset_once_per_seed_the_same_every_epoch(tmp_path):
    records = [{"instruction": "q", "output": c} for c in "abcdefgh"] * 2
    spec = DatasetSpec("minigpt4qwen", write_json(tmp_path / "w.json", records), weight=1.5)

    def index(seed: int, epoch: int = 0) -> list[int]:
        tok = build_tiny_chat_tokenizer(["q a b c d e f g h"])
        ds = ConversationDataset(DataConfig(datasets=[spec]), tok, image_token_id=3, num_query_tokens=4, seed=seed)
        ds.set_epoch(epoch)
        return ds.index.tolist()

    # As data/config.py documents: drawn once from the seed, the same every epoch (the sampler relies on it).
    assert len(index(0)) == 16 + 8 and index(0) == index(0, epoch=3)
    assert any(index(seed) != index(0) for seed in (1, 2, 3))
