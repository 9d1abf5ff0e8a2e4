"""Training never loses samples or steps silently: data events are logged, recorded and summarised; a resumed run
marks its restart in metrics.jsonl; killed saves are cleaned up (or put back); a resume with fewer trainable parts
says so. The memory estimate counts what torch keeps; fp16 parameters under fp16 training are refused up front."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import atomic_directory
from minigpt4qwen.checkpoint.sources import read_model_checkpoint
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.dataset import ConversationDataset
from minigpt4qwen.data.formats import IMAGE_WRAP
from minigpt4qwen.model.parts import PartDtypes, TrainableParts
from minigpt4qwen.training.config import RunConfig
from minigpt4qwen.training.memory import check_training_memory, estimate_memory
from minigpt4qwen.training.metrics import METRICS_NAME
from minigpt4qwen.training.state import remove_interrupted_saves
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
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "checkpoint-00000007") as tmp:
        raise KeyboardInterrupt  # removes the temporary directory; a hard kill would not have
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    (tmp_path / "keep.tmp-abcdefgh").mkdir()
    assert [p.name for p in remove_interrupted_saves(tmp_path)] == [tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp-abcdefgh"]


def _llm_shaped(dtype: torch.dtype = torch.float32) -> nn.Module:
    """One trainable weight, and the LLM shape the activation estimate reads (32 blocks of width 8)."""
    model = nn.Linear(64, 64, bias=False).to(dtype)
    model.config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=8, num_hidden_layers=32))
    return model


def test_the_memory_estimate_counts_moments_in_the_parameter_dtype_and_checkpointing_of_every_kth_block():
    model = _llm_shaped(torch.bfloat16)
    args = dict(micro_batch_size=2, max_length=4, activation_bytes=2, device=torch.device("cpu"))
    estimate = estimate_memory(model, checkpointed_llm=False, **args)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 64, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    moments = [v for v in optimizer.state[model.weight].values() if v.dim()]  # not the scalar step count
    assert estimate.gradients_and_optimizer == model.weight.grad.nbytes + sum(v.nbytes for v in moments)
    block = 2 * 4 * 8 * 2  # one block's input: micro-batch x tokens x width x bytes
    assert estimate.activations == block * 32 * 16
    assert estimate_memory(model, checkpointed_llm=True, **args).activations == block * (32 + 16)
    # every=2: 16 checkpointed blocks keep their inputs, 16 keep everything, one is recomputed at a time.
    every2 = estimate_memory(model, checkpointed_llm=True, checkpoint_every=2, **args).activations
    assert every2 == block * (16 + 16 * 16 + 16)


@pytest.mark.parametrize("engine", ["ddp", "deepspeed", "pipeline"])
def test_the_memory_check_refuses_what_cannot_fit_and_skips_the_partitioning_engines(engine, caplog):
    cfg = RunConfig()
    cfg.train.micro_batch_size = 10**9  # far beyond any device under DDP
    cfg.parallel.engine = engine
    with caplog.at_level(logging.INFO, logger="minigpt4qwen.training.memory"):
        if engine == "ddp":
            with pytest.raises(MemoryError, match="this run will not fit"):
                check_training_memory(_llm_shaped(), cfg, torch.device("cpu"))
        else:  # ZeRO partitions (and may offload) what one whole-model estimate counts
            assert check_training_memory(_llm_shaped(), cfg, torch.device("cpu")) is None
            assert f"no pre-flight estimate under parallel.engine={engine}" in caplog.text
    cfg.train.check_memory = False
    assert check_training_memory(_llm_shaped(), cfg, torch.device("cpu")) is None


def test_fp16_training_of_fp16_parameters_is_refused_with_what_to_set(tmp_path):
    cfg = RunConfig(data=DataConfig(datasets=[DatasetSpec("minigpt4qwen", "train.json", "images")]))
    cfg.train.precision = "fp16"
    cfg.model.dtypes.language_model = "fp16"  # frozen: fine
    cfg.validate()
    cfg.model.dtypes.language_projection = "fp16"  # trained: the gradient scaler cannot unscale its gradients
    with pytest.raises(ValueError, match=r"set model\.dtypes\.language_projection=fp32, or use train\.precision=bf16"):
        cfg.validate()
    cfg.parallel.engine, cfg.model.dtypes = "deepspeed", PartDtypes.uniform("fp16")  # fp32 master weights there
    cfg.validate()
    model = tiny(TrainableParts())
    model.language_projection.half()  # the same through the Python API: refused before the first step
    trainer = Trainer(model, config(tmp_path, precision="fp16", max_steps=1), ToyDataset(), collate)
    with pytest.raises(ValueError, match=r"model\.dtypes\.<part>=fp32"):
        trainer.fit()


def _write(directory: Path, text: str) -> None:
    with atomic_directory(directory) as tmp:
        (tmp / "v").write_text(text)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and directory fsync")
def test_an_atomic_directory_is_as_readable_as_any_and_its_rename_is_synced(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((os.fstat(fd).st_ino, final.exists())),
                                                 real_fsync(fd)))
    final, umask = tmp_path / "checkpoint-00000001", os.umask(0o027)
    try:
        _write(final, "first")
        _write(final, "second")  # replaces it
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750
    assert (final / "v").read_text() == "second"
    assert (tmp_path.stat().st_ino, True) in synced  # the parent, once the new directory is in it


def test_a_save_killed_while_it_replaced_a_checkpoint_is_repaired(tmp_path, monkeypatch):
    done, cut = tmp_path / "checkpoint-00000004", tmp_path / "checkpoint-00000005"
    _write(done, "old")
    _write(cut, "old")
    real_replace, renames = os.replace, []

    def second_rename_killed(src, dst):
        renames.append(src)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # a kill deletes nothing
        _write(done, "new")  # killed after both renames, before the old version was deleted
        patch.setattr(os, "replace", second_rename_killed)
        with pytest.raises(KeyboardInterrupt):
            _write(cut, "new")  # killed between the two renames: no checkpoint-00000005 at all
    (tmp_path / ".notes.old-12").mkdir()  # not ours
    assert not cut.exists() and len([p for p in tmp_path.iterdir() if ".old-" in p.name]) == 3
    removed = sorted(p.name for p in remove_interrupted_saves(tmp_path))
    assert removed[0] == f".{done.name}.old-{os.getpid()}" and removed[1].startswith(f".{cut.name}.tmp-")
    assert len(removed) == 2  # the old version of checkpoint-00000005 was put back instead
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.old-12", done.name, cut.name]
    assert (done / "v").read_text() == "new" and (cut / "v").read_text() == "old"


def test_a_crafted_training_state_is_refused_without_running_its_code(tmp_path):
    from minigpt4qwen.checkpoint.keymap import CheckpointError
    from minigpt4qwen.checkpoint.native import save_checkpoint
    from minigpt4qwen.training import state as ckpt
    from tests.conftest import make_tiny_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = make_tiny_model()
    save_checkpoint(model, tmp_path / "ckpt")
    torch.save({"position": {}, "payload": Payload()}, tmp_path / "ckpt" / ckpt.STATE_NAME)
    optimizer = torch.optim.AdamW(model.language_projection.parameters())
    with pytest.raises(CheckpointError, match="unreadable training state"):
        ckpt.load_training_checkpoint(tmp_path / "ckpt", model, optimizer, None, None)
    assert not marker.exists()
