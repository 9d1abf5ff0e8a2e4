"""A resumed run whose circumstances changed: other data is refused (and an old checkpoint never hangs the loop),
new optimizer settings are followed from the first resumed step, and a roll-back sets the abandoned newer
checkpoints aside."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.training import state as ckpt
from minigpt4qwen.training.config import LrMultipliers
from minigpt4qwen.training.metrics import METRICS_NAME
from minigpt4qwen.training.optim import WarmupCosine
from minigpt4qwen.training.trainer import Trainer
from tests.test_trainer import ToyDataset, collate, config, run, tiny


def test_a_resume_over_fewer_samples_is_refused_and_an_old_checkpoint_moves_to_the_next_epoch(tmp_path):
    run(tmp_path, max_steps=6, save_every_steps=6)  # 32 samples: 8 steps an epoch, saved at step 6 of epoch 0
    source = tmp_path / "checkpoint-00000006"
    shrunk = Trainer(tiny(), config(tmp_path, max_steps=10, resume="auto"), ToyDataset(16), collate)
    with pytest.raises(CheckpointError) as info:
        shrunk.resume()
    message = str(info.value)
    assert "written by a run over 32 training samples, this run has 16" in message
    assert f"model.checkpoint={source} train.resume=none" in message
    # A checkpoint written before the sample count was recorded cannot be checked; its position lies past the end
    # of the now 4-step epochs, where the loop would never reach the epoch's end: it continues with epoch 1.
    state = torch.load(source / ckpt.STATE_NAME, weights_only=False)
    del state["position"]["samples"]
    torch.save(state, source / ckpt.STATE_NAME)
    old = Trainer(tiny(), config(tmp_path, max_steps=10, resume="auto"), ToyDataset(16), collate)
    assert old.resume() == source
    assert (old.position.epoch, old.position.step_in_epoch, old.position.samples) == (1, 0, 16)
    assert old.fit().global_step == 10


def _lrs(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if row.get("kind") == "train"}


def test_an_extended_run_follows_its_new_schedule(tmp_path):
    run(tmp_path, max_steps=2, save_every_steps=2, warmup_steps=0)  # lr 1e-3, weight decay 0.05
    new = dict(max_steps=10, lr=5e-4, weight_decay=0.0, betas=[0.8, 0.99], warmup_steps=0,
               lr_multipliers=LrMultipliers(language_projection=2.0))
    trainer = Trainer(tiny(), config(tmp_path, resume="auto", **new), ToyDataset(), collate)
    trainer.resume()
    fresh = Trainer(tiny(), config(tmp_path / "fresh", **new), ToyDataset(), collate)
    assert vars(trainer.scheduler.lr_lambdas[0]) == vars(fresh.scheduler.lr_lambdas[0])  # min_lr ratio included
    assert trainer.scheduler.last_epoch == 2
    assert trainer.scheduler.base_lrs == fresh.scheduler.base_lrs
    factor = WarmupCosine(0, 10, 1e-5 / 5e-4)(2)
    for resumed, configured in zip(trainer.optimizer.param_groups, fresh.optimizer.param_groups, strict=True):
        for key in ("name", "initial_lr", "weight_decay", "betas"):
            assert resumed[key] == configured[key], (resumed["name"], key)
        assert resumed["lr"] == pytest.approx(configured["initial_lr"] * factor), resumed["name"]
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {5e-4, 1e-3}  # the projection's x2
    assert trainer.optimizer.state  # the moments are the checkpoint's
    # Every resumed step, the first included, trains at the lr of an uninterrupted run with the new settings.
    trainer.fit()
    fresh.fit()
    resumed_lrs, fresh_lrs = _lrs(tmp_path), _lrs(tmp_path / "fresh")
    assert [resumed_lrs[step] for step in range(3, 11)] == pytest.approx([fresh_lrs[step] for step in range(3, 11)])


def test_a_roll_back_sets_the_newer_checkpoints_aside(tmp_path, caplog):
    Trainer(tiny(), config(tmp_path, max_steps=6, save_every_steps=1, keep_last=3), ToyDataset(), collate).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"checkpoint-0000000{i}" for i in (4, 5, 6)]
    back = Trainer(tiny(), config(tmp_path, max_steps=8, save_every_steps=1, keep_last=3,
                                  resume=str(tmp_path / "checkpoint-00000004")), ToyDataset(), collate)
    with caplog.at_level(logging.WARNING):
        back.resume()
    assert "checkpoint-00000006 is newer than the resumed step 4: renamed to checkpoint-00000006.abandoned" \
        in caplog.text
    assert ckpt.find_latest(tmp_path).name == "checkpoint-00000004"  # what a restart now resumes from
    back.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"checkpoint-0000000{i}" for i in (6, 7, 8)]
    assert (tmp_path / "checkpoint-00000005.abandoned").is_dir() and (tmp_path / "checkpoint-00000006.abandoned")
    # Abandoned twice at the same step: the first one keeps its name.
    assert ckpt.set_aside_newer(tmp_path, 7) == [tmp_path / "checkpoint-00000008.abandoned"]
    assert ckpt.set_aside_newer(tmp_path, 5) == [tmp_path / "checkpoint-00000006.abandoned-1",
                                                 tmp_path / "checkpoint-00000007.abandoned"]
    assert ckpt.find_latest(tmp_path) is None
