"""Batch inference through the generation scheduler: answers exactly as one-by-one chat sessions; formats, bad
records, failed generations, per-record seeds, beam search, the CLI."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from minigpt4qwen.checkpoint.export import export_hf
from minigpt4qwen.data.formats import DataError
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.batch import generate_file, record_seed
from minigpt4qwen.inference.frontends.prompt_records import prompt_inputs, read_prompts
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
def scheduler(model_and_tokenizer):
    """Fewer slots than records, so records wait for a slot and join while others decode."""
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=2, capacity=256)
    yield scheduler
    scheduler.close()


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


def test_batched_greedy_equals_one_by_one(model_and_tokenizer, scheduler, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    expected = [_one_by_one(model, tokenizer, data_dir, r) for r in RECORDS]
    assert len(set(expected)) >= 4  # the answers depend on the images and the text, so the check means something
    report = generate_file(scheduler, data_dir / "prompts.jsonl", tmp_path / "out.jsonl", GREEDY, in_flight=3,
                           progress=False)
    assert report.written == len(RECORDS) and report.skipped == []
    lines = _lines(tmp_path / "out.jsonl")
    assert [line["answer"] for line in lines] == expected
    assert [line["id"] for line in lines] == ["r", 1, 7, 3, 4]
    # The query as a reader sees it: image markers removed, the words kept.
    assert [line["query"] for line in lines] == [r["query"] for r in RECORDS[:4]] + ["is the shape red"]
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_original_format_json_list_with_image_root(model_and_tokenizer, scheduler, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    records = [
        {"image": "red.png", "instruction": "<Img><ImageHere></Img> what colour is the shape", "output": "red"},
        {"image": "blue.png", "instruction": ["what colour", "what shape is it"], "output": ["blue", "circle"]},
    ]
    (tmp_path / "original.json").write_text(json.dumps(records))
    generate_file(scheduler, tmp_path / "original.json", tmp_path / "out.jsonl", GREEDY, image_root=data_dir / "img",
                  progress=False)
    first, second = _lines(tmp_path / "out.jsonl")
    assert first["answer"] == _one_by_one(model, tokenizer, data_dir / "img",
                                          {"image": "red.png", "query": records[0]["instruction"]})
    session = ChatSession(model, tokenizer)  # earlier turns become the history, the last instruction is asked
    session.add_turn("what colour", "blue", images=[data_dir / "img" / "blue.png"])
    assert second == {"id": 1, "query": "what shape is it", "answer": session.ask("what shape is it", GREEDY)}


def test_bad_records_are_reported_and_skipped_or_fatal(scheduler, data_dir, tmp_path, capsys):
    records = [
        {"image": "img/red.png", "query": "what"},
        ["not", "an", "object"],
        {"image": "img/red.png"},
        {"image": "img/missing.png", "query": "what"},
        {"image": "img/broken.png", "query": "what"},
        {"image": "img/red.png", "query": "<ImageHere><ImageHere> what"},
        {"query": 5},
        {"image": "img/red.png", "query": "what", "id": float("nan")},  # NaN: no JSON for its output line
    ]
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(records))
    report = generate_file(scheduler, source, tmp_path / "out.jsonl", GREEDY, in_flight=2, image_root=data_dir,
                           progress=False)
    assert report.written == 1 and [line["id"] for line in _lines(tmp_path / "out.jsonl")] == [0]
    kinds = {e.index: e.kind for e in report.skipped}
    assert kinds == {1: "malformed_record", 2: "malformed_record", 3: "missing_image", 4: "corrupt_image",
                     5: "marker_mismatch", 6: "malformed_record", 7: "malformed_record"}
    err = capsys.readouterr().err
    assert f"{source}: record 4: corrupt_image" in err and f"{source}: record 3: missing_image" in err
    errors = _lines(tmp_path / "out.jsonl.errors.jsonl")  # every skipped record, also in a file beside the output
    assert {e["index"]: e["kind"] for e in errors} == kinds and {e["file"] for e in errors} == {str(source)}
    assert all(e["detail"] for e in errors)
    with pytest.raises(DataError, match=r"bad\.json: record 1: malformed_record"):
        generate_file(scheduler, source, tmp_path / "out.jsonl", GREEDY, image_root=data_dir, on_error="fail",
                      progress=False)
    source.write_text("{not json")
    with pytest.raises(DataError, match="unreadable_file"):
        generate_file(scheduler, source, tmp_path / "out.jsonl", GREEDY, progress=False)
    lines = tmp_path / "lines.jsonl"  # in JSONL one bad line is one bad record: not JSON, not UTF-8, too deep
    good = json.dumps(records[0]).encode()
    lines.write_bytes(b"\n".join([good, b"{not json", good, b'{"query": "caf\xe9"}', b"[" * 100_000, good]) + b"\n")
    report = generate_file(scheduler, lines, tmp_path / "out.jsonl", GREEDY, image_root=data_dir, progress=False)
    assert report.written == 3 and [(e.index, e.kind) for e in report.skipped] == [(i, "malformed_record")
                                                                                  for i in (1, 3, 4)]
    assert [e["index"] for e in _lines(tmp_path / "out.jsonl.errors.jsonl")] == [1, 3, 4]  # this run's errors only


def test_stop_strings_and_sampling_seed(scheduler, data_dir, tmp_path):
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]))

    def answers(settings):
        generate_file(scheduler, tmp_path / "two.jsonl", tmp_path / "out.jsonl", settings, image_root=data_dir,
                      progress=False)
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
         str(root / "out" / "out.jsonl"), "--model-dir", str(root / "model"), "--slots", "2",
         "--max-new-tokens", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, root / "out" / "out.jsonl"
    process.kill()


def test_generate_subcommand(scheduler, data_dir, tmp_path, subcommand):
    process, output = subcommand
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    generate_file(scheduler, data_dir / "prompts.jsonl", tmp_path / "api.jsonl", GREEDY, progress=False)
    assert _lines(output) == _lines(tmp_path / "api.jsonl")
    assert "generate: 100%" in stderr and "5/5" in stderr  # the progress bar
    assert "wrote 5 answer(s)" in stdout


def test_a_failed_generation_is_skipped_not_fatal(model_and_tokenizer, data_dir, tmp_path, monkeypatch, capsys):
    model, tokenizer = model_and_tokenizer
    records = [*RECORDS, {"image": "img/red.png", "query": "what colour is the shape " * 20}]  # > 100 tokens
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    no_image = next(p for p in read_prompts(source, data_dir) if p.index == 2)
    doomed = len(prompt_inputs(model, tokenizer, no_image, [])[0])  # the only prompt of this length
    scheduler = GenerationScheduler(model, tokenizer, slots=3, capacity=100)
    prefill = scheduler.decoder.launch_prefill

    def prefill_that_runs_out_of_memory(chunks, sample):  # a batch with record 2 fails, then record 2 alone
        if any(len(chunk.embeds) == doomed for chunk in chunks):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return prefill(chunks, sample)

    monkeypatch.setattr(scheduler.decoder, "launch_prefill", prefill_that_runs_out_of_memory)
    try:
        report = generate_file(scheduler, source, tmp_path / "out.jsonl", GREEDY, image_root=data_dir,
                               progress=False)
        assert report.written == 4 and [(e.index, e.kind) for e in report.skipped] == [
            (2, "generation_failed"), (5, "generation_failed")]
        assert "OutOfMemoryError: CUDA out of memory (test)" in report.skipped[0].detail
        assert "does not fit a slot of 100 tokens" in report.skipped[1].detail
        assert f"{source}: record 5: generation_failed" in capsys.readouterr().err
        lines = _lines(tmp_path / "out.jsonl")  # the other records answered as if nothing had failed
        assert [line["id"] for line in lines] == ["r", 1, 3, 4]
        assert [line["answer"] for line in lines] == [_one_by_one(model, tokenizer, data_dir, r)
                                                      for r in (RECORDS[0], RECORDS[1], RECORDS[3], RECORDS[4])]
        assert [e["index"] for e in _lines(tmp_path / "out.jsonl.errors.jsonl")] == [2, 5]
        with pytest.raises(DataError, match=r"record 2: generation_failed: OutOfMemoryError"):
            generate_file(scheduler, source, tmp_path / "out.jsonl", GREEDY, image_root=data_dir, on_error="fail",
                          progress=False)
    finally:
        scheduler.close()


def test_per_record_seeds_make_sampled_answers_independent_of_the_batch(model_and_tokenizer, scheduler, data_dir,
                                                                      tmp_path):
    sampled = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, seed=5)

    def answers(scheduler, settings, source="prompts.jsonl", in_flight=None):
        generate_file(scheduler, data_dir / source, tmp_path / "out.jsonl", settings, in_flight=in_flight,
                      progress=False)
        return [line["answer"] for line in _lines(tmp_path / "out.jsonl")]

    together = answers(scheduler, sampled)  # 2 slots, up to 4 records in flight
    alone = GenerationScheduler(*model_and_tokenizer, slots=1, capacity=256)
    try:
        assert answers(alone, sampled, in_flight=1) == together  # one record at a time
    finally:
        alone.close()
    (data_dir / "first_two.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]))
    assert answers(scheduler, sampled, "first_two.jsonl") == together[:2]  # without the other records
    (data_dir / "same.jsonl").write_text("\n".join([json.dumps(RECORDS[0])] * 4))
    assert len(set(answers(scheduler, sampled, "same.jsonl"))) > 1  # one question asked 4 times: 4 draws
    greedy = answers(scheduler, GREEDY)
    assert together != greedy and answers(scheduler, dataclasses.replace(sampled, seed=6)) != together
    assert len({record_seed(5, i) for i in range(5)} | {record_seed(6, 0)}) == 6 and record_seed(None, 3) is None


def test_beam_search_answers_each_record_alone(model_and_tokenizer, scheduler, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    beams = GenerationSettings(max_new_tokens=8, num_beams=3)
    generate_file(scheduler, data_dir / "prompts.jsonl", tmp_path / "out.jsonl", beams, progress=False)
    expected = []
    for record in RECORDS:
        session = ChatSession(model, tokenizer)
        images = record.get("image", [])
        for path in [images] if isinstance(images, str) else images:
            session.add_image(data_dir / path)
        expected.append(session.ask(record["query"], beams))
    assert [line["answer"] for line in _lines(tmp_path / "out.jsonl")] == expected
