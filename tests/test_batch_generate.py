"""Batch inference: left-padded batches answer exactly as one-by-one chat sessions; formats, bad records, the CLI."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from minigpt4qwen.checkpoint.export import export_hf
from minigpt4qwen.data.formats import DataError
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.batch import generate_file
from tests.conftest import make_tiny_chat_model

GREEDY = GenerationSettings(max_new_tokens=10)
COLOURS = ("red", "green", "blue", "white")
RECORDS = [  # lengths differ (so rows are padded), 0-2 images each
    {"id": "r", "image": "img/red.png", "query": "what colour is the shape"},
    {"image": ["img/green.png", "img/blue.png"], "query": "what"},
    {"id": 7, "query": "是 什 么 颜 色 the shape is"},
    {"image": "img/white.png", "query": "what colour"},
    {"image": "img/blue.png", "query": "<Img><ImageHere></Img> is the shape red"},
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """A tiny model whose answers clearly depend on the image: the vision parts get large random weights."""
    model, tokenizer = make_tiny_chat_model(seed=2, image_std=0.5)
    return model, tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    (root / "img").mkdir()
    for colour in COLOURS:
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{colour}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG truncated")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n")
    return root


def _one_by_one(model, tokenizer, root, record):
    session = ChatSession(model, tokenizer)
    images = record.get("image", [])
    for path in [images] if isinstance(images, str) else images:
        session.add_image(root / path)
    return session.ask(record["query"], GREEDY)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_greedy_equals_one_by_one(model_and_tokenizer, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    expected = [_one_by_one(model, tokenizer, data_dir, r) for r in RECORDS]
    assert len(set(expected)) >= 4  # the answers depend on the images and the text, so the check means something
    report = generate_file(model, tokenizer, data_dir / "prompts.jsonl", tmp_path / "out.jsonl", GREEDY,
                           batch_size=3, progress=False)
    assert report.written == len(RECORDS) and report.skipped == []
    lines = _lines(tmp_path / "out.jsonl")
    assert [line["answer"] for line in lines] == expected
    assert [line["id"] for line in lines] == ["r", 1, 7, 3, 4]
    # The query as a reader sees it: image markers removed, the words kept.
    assert [line["query"] for line in lines] == [r["query"] for r in RECORDS[:4]] + ["is the shape red"]
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_original_format_json_list_with_image_root(model_and_tokenizer, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    records = [
        {"image": "red.png", "instruction": "<Img><ImageHere></Img> what colour is the shape", "output": "red"},
        {"image": "blue.png", "instruction": ["what colour", "what shape is it"], "output": ["blue", "circle"]},
    ]
    (tmp_path / "original.json").write_text(json.dumps(records))
    generate_file(model, tokenizer, tmp_path / "original.json", tmp_path / "out.jsonl", GREEDY,
                  image_root=data_dir / "img", progress=False)
    first, second = _lines(tmp_path / "out.jsonl")
    assert first["answer"] == _one_by_one(model, tokenizer, data_dir / "img",
                                          {"image": "red.png", "query": records[0]["instruction"]})
    session = ChatSession(model, tokenizer)  # earlier turns become the history, the last instruction is asked
    session.add_turn("what colour", "blue", images=[data_dir / "img" / "blue.png"])
    assert second == {"id": 1, "query": "what shape is it", "answer": session.ask("what shape is it", GREEDY)}


def test_bad_records_are_reported_and_skipped_or_fatal(model_and_tokenizer, data_dir, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    records = [
        {"image": "img/red.png", "query": "what"},
        ["not", "an", "object"],
        {"image": "img/red.png"},
        {"image": "img/missing.png", "query": "what"},
        {"image": "img/broken.png", "query": "what"},
        {"image": "img/red.png", "query": "<ImageHere><ImageHere> what"},
        {"query": 5},
    ]
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(records))
    report = generate_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY, batch_size=2,
                           image_root=data_dir, progress=False)
    assert report.written == 1 and [line["id"] for line in _lines(tmp_path / "out.jsonl")] == [0]
    kinds = {e.index: e.kind for e in report.skipped}
    assert kinds == {1: "malformed_record", 2: "malformed_record", 3: "missing_image", 4: "corrupt_image",
                     5: "marker_mismatch", 6: "malformed_record"}
    err = capsys.readouterr().err
    assert f"{source}: record 4: corrupt_image" in err and f"{source}: record 3: missing_image" in err
    errors = _lines(tmp_path / "out.jsonl.errors.jsonl")  # every skipped record, also in a file beside the output
    assert {e["index"]: e["kind"] for e in errors} == kinds and {e["file"] for e in errors} == {str(source)}
    assert all(e["detail"] for e in errors)
    with pytest.raises(DataError, match=r"bad\.json: record 1: malformed_record"):
        generate_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY, image_root=data_dir,
                      on_error="fail", progress=False)
    source.write_text("{not json")
    with pytest.raises(DataError, match="unreadable_file"):
        generate_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY, progress=False)
    lines = tmp_path / "lines.jsonl"  # in JSONL one bad line is one bad record
    lines.write_text(json.dumps(records[0]) + "\n{not json\n" + json.dumps(records[0]) + "\n")
    report = generate_file(model, tokenizer, lines, tmp_path / "out.jsonl", GREEDY, image_root=data_dir,
                           progress=False)
    assert report.written == 2 and [(e.index, e.kind) for e in report.skipped] == [(1, "malformed_record")]
    assert [e["index"] for e in _lines(tmp_path / "out.jsonl.errors.jsonl")] == [1]  # this run's errors only


def test_stop_strings_and_sampling_seed(model_and_tokenizer, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]))

    def answers(settings):
        generate_file(model, tokenizer, tmp_path / "two.jsonl", tmp_path / "out.jsonl", settings,
                      image_root=data_dir, progress=False)
        return [line["answer"] for line in _lines(tmp_path / "out.jsonl")]

    full = answers(GREEDY)[0]
    stop = full[3:5]
    assert answers(GenerationSettings(max_new_tokens=10, stop=("@@", stop)))[0] == full[:full.find(stop)].strip()
    sampled = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, seed=5)
    assert answers(sampled) == answers(sampled)


@pytest.fixture(scope="module", autouse=True)
def subcommand(model_and_tokenizer, data_dir, tmp_path_factory):
    """`minigpt4qwen generate` on an export, started with the module so the process loads while tests run."""
    root = tmp_path_factory.mktemp("cli")
    export_hf(*model_and_tokenizer, root / "model")
    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt4qwen.cli.main", "generate", str(data_dir / "prompts.jsonl"),
         str(root / "out" / "out.jsonl"), "--model-dir", str(root / "model"), "--batch-size", "2",
         "--max-new-tokens", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, root / "out" / "out.jsonl"
    process.kill()


def test_generate_subcommand(model_and_tokenizer, data_dir, tmp_path, subcommand):
    process, output = subcommand
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    generate_file(*model_and_tokenizer, data_dir / "prompts.jsonl", tmp_path / "api.jsonl", GREEDY, progress=False)
    assert _lines(output) == _lines(tmp_path / "api.jsonl")
    assert "generate: 100%" in stderr and "5/5" in stderr  # the progress bar
    assert "wrote 5 answer(s)" in stdout
