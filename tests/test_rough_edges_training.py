"""Training never loses samples or steps silently: data events are logged, recorded and summarised; a resumed run
marks its restart in metrics.jsonl; killed saves are cleaned up; a resume with fewer trainable parts says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.sources import read_model_checkpoint
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.data.formats import IMAGE_WRAP
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training.metrics import METRICS_NAME
from minigpt4qwen.training.trainer import Trainer
from tests.conftest import make_tiny_chat_model
from tests.test_trainer import ToyDataset, collate, config, tiny

QUESTION = f"{IMAGE_WRAP} what colour is the shape"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def test_truncated_dropped_and_skipped_samples_are_logged_recorded_and_summarised(tmp_path, caplog):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "red.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    records = [
        {"image": "red.png", "instruction": QUESTION, "output": "red"},
        {"image": "red.png", "instruction": QUESTION, "output": " ".join(["red green blue"] * 12)},  # answer cut
        {"image": "red.png", "instruction": f"{QUESTION} {'red ' * 40}", "output": "red"},  # cannot fit
        {"image": "corrupt.png", "instruction": QUESTION, "output": "red"},  # skipped
        {"image": "red.png", "instruction": QUESTION, "output": "green"},
        {"image": "red.png", "instruction": QUESTION, "output": "blue"},
        {"instruction": " ", "output": "blue"},  # empty instruction: skipped when the file is read
    ]
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps(records))
    model, tokenizer = make_tiny_chat_model()
    data = DataConfig(datasets=[DatasetSpec("minigpt4qwen", str(annotation), str(tmp_path))], image_size=28,
                      max_txt_len=48, bad_sample_policy="skip", num_workers=0)
    dataset = ConversationDataset(data, tokenizer, image_token_id=model.image_token_id, num_query_tokens=4)
    assert len(dataset) == 6 and "record 6: empty_instruction" in str(dataset.load_problems[0])
    out = tmp_path / "run"
    model.set_trainable(TrainableParts())
    trainer = Trainer(model, config(out, max_steps=3, grad_accum=1), dataset, DataCollator(tokenizer.pad_token_id))
    with caplog.at_level(logging.INFO, logger="minigpt4qwen.training.metrics"):
        trainer.fit()  # one epoch: every record is read once; item 2 is replaced by 3, which is replaced by 4
    rows = read_metrics(out)
    per_step = [row for row in rows if row.get("kind") == "data"]
    named = [name for row in per_step for name in row["records"]]
    (summary,) = [row for row in rows if row.get("kind") == "data_summary"]
    assert summary["counts"] == {"truncated_answer": 1, "dropped_too_long": 1, "skipped_corrupt_image": 2}
    assert sum(row.get("skipped_corrupt_image", 0) for row in per_step) == 2
    where = f"{annotation}: record"
    for expected in (f"{where} 1: truncated_answer", f"{where} 2: too_long", f"{where} 3: corrupt_image"):
        assert any(name.startswith(expected) for name in named), expected
        assert any(name.startswith(expected) for name in summary["records"]), expected
    assert summary["load_skipped"] == 1 and any(f"{where} 6: empty_instruction" in r for r in summary["records"])
    assert summary["records_total"] == 4  # distinct records: corrupt.png's, seen twice, once
    logged = caplog.text
    assert f"{where} 2: too_long" in logged and "dropped: dropped_too_long 1" in logged
    assert "data, whole run: truncated: truncated_answer 1; dropped: dropped_too_long 1; skipped: " in logged


def test_killed_save_is_cleaned_up_and_the_resume_is_marked_in_the_metrics(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(tiny(), config(out, max_steps=4, save_every_steps=2), ToyDataset(), collate).fit()
    # A kill while checkpoint 4 was being written: its temporary directory stays, the checkpoint never appears.
    stale = out / ".checkpoint-00000004.tmp-k1ll3d_x"
    (out / "checkpoint-00000004").rename(stale)
    foreign = [out / ".notes.tmp-abcdefgh", out / "checkpoint-00000009.tmp-abcdefgh"]
    for path in foreign:
        path.mkdir()
    resumed = Trainer(tiny(), config(out, max_steps=4, save_every_steps=2, resume="auto"), ToyDataset(), collate)
    assert resumed.resume() == out / "checkpoint-00000002"
    with caplog.at_level(logging.WARNING):
        assert resumed.fit().global_step == 4
    assert not stale.exists() and all(path.is_dir() for path in foreign)  # only our own temporary directory
    assert f"removing {stale}" in caplog.text
    rows = read_metrics(out)
    (marker,) = [i for i, row in enumerate(rows) if row.get("event") == "resume"]
    assert rows[marker]["step"] == 2 and rows[marker]["last_logged_step"] == 4
    steps = [row["step"] for row in rows if row.get("kind") == "train"]
    after = [row["step"] for row in rows[marker + 1 :] if row.get("kind") == "train"]
    assert steps[:4] == [1, 2, 3, 4] and after == [3, 4]


@pytest.mark.parametrize("contents", ["trainable", "all"])
def test_resume_with_fewer_trainable_parts_names_the_file_and_the_parts(tmp_path, contents):
    out = tmp_path / "run"
    Trainer(tiny(), config(out, max_steps=2, save_contents=contents), ToyDataset(), collate).fit()
    fewer = Trainer(tiny(TrainableParts()), config(out, max_steps=4, resume="auto"), ToyDataset(), collate)
    with pytest.raises(CheckpointError) as info:
        fewer.resume()
    message = str(info.value)
    assert message.startswith(f"{out / 'checkpoint-00000002' / 'training_state.pt'}: its optimizer state is for")
    assert "'language_model'], this run trains ['language_projection'] (model.trainable changed?)" in message
    assert f"model.checkpoint={out / 'checkpoint-00000002'} train.resume=none" in message
    # The advice works: model.checkpoint reads those weights.
    assert set(read_model_checkpoint(out / "checkpoint-00000002")) >= {"language_projection.weight"}


def test_stale_temporary_directories_need_our_own_names(tmp_path):
    from minigpt4qwen.checkpoint.native import atomic_directory
    from minigpt4qwen.training.state import remove_interrupted_saves

    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "checkpoint-00000007") as tmp:
        raise KeyboardInterrupt  # removes the temporary directory; a hard kill would not have
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    (tmp_path / "keep.tmp-abcdefgh").mkdir()
    assert [p.name for p in remove_interrupted_saves(tmp_path)] == [tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp-abcdefgh"]
