"""The trainer's guarantees: exact resume, accumulation and DDP equivalence, frozen parts untouched, guards."""

from __future__ import annotations

import gc
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt4qwen.data.sampler import epoch_plan
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training import state as ckpt
from minigpt4qwen.training.config import TrainConfig
from minigpt4qwen.training.distributed import DistInfo, wrap_ddp
from minigpt4qwen.training.optim import WarmupCosine
from minigpt4qwen.training.trainer import Trainer
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_model


class ToyDataset(torch.utils.data.Dataset):
    """Random one-image samples of varying length; `nan_index` gets NaN pixels."""

    def __init__(self, n: int = 32, seed: int = 0, nan_index: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            text = torch.randint(6, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            ids = torch.cat([torch.tensor([2]), torch.full((NUM_QUERIES,), IMAGE_TOKEN_ID), text])
            labels = ids.clone()
            labels[: 1 + NUM_QUERIES] = -100
            pixels = torch.randn(1, 3, 28, 28, generator=g)
            if i == nan_index:
                pixels[:] = math.nan
            self.items.append((ids, labels, pixels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(samples: list) -> dict:
    length = 16  # fixed padding: batch splits then differ only in summation order
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), -100)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (ids, lab, _) in enumerate(samples):
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.cat([p for _, _, p in samples])}


def tiny(parts: TrainableParts | None = None) -> nn.Module:
    model = make_tiny_model()
    for module in model.modules():  # dropout off: equivalence tests compare different batch splits
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.set_trainable(parts or TrainableParts.all())
    return model


def config(out: Path, **kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr=1e-5, warmup_steps=2, micro_batch_size=2, grad_accum=2, precision="fp32",
                output_dir=str(out), tensorboard=False, progress_bar=False, log_every=1, resume="none", keep_last=0)
    return TrainConfig(**{**base, **kw})


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def first_step_grads(trainer: Trainer) -> tuple[float, torch.Tensor]:
    """The logged loss and the gradient of the first optimizer step (before any update)."""
    batches = trainer._micro_batches(0, 0)
    loss, _, _ = trainer._step([next(batches) for _ in range(trainer.cfg.grad_accum)])
    grads = torch.cat([p.grad.flatten() for p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss, grads


def assert_same_grads(a: torch.Tensor, b: torch.Tensor) -> None:
    # Equal up to summation order (~1e-7); a wrong loss scaling would be off by a factor, not a rounding error.
    assert (a - b).norm() / a.norm() < 1e-5


def run(out: Path, model: nn.Module | None = None, dataset=None, **kw):
    model = model or tiny()
    result = Trainer(model, config(out, **kw), dataset or ToyDataset(), collate).fit()
    return model, result


def test_scheduler_golden_values():
    f = WarmupCosine(warmup_steps=4, total_steps=12, min_ratio=0.01)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert f(12) == pytest.approx(0.01) and f(20) == pytest.approx(0.01)


def test_accumulation_equals_large_micro_batch(tmp_path):
    ta = Trainer(tiny(), config(tmp_path / "a", micro_batch_size=2, grad_accum=4, max_steps=3), ToyDataset(), collate)
    tb = Trainer(tiny(), config(tmp_path / "b", micro_batch_size=8, grad_accum=1, max_steps=3), ToyDataset(), collate)
    (loss_a, grads_a), (loss_b, grads_b) = first_step_grads(ta), first_step_grads(tb)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert_same_grads(grads_a, grads_b)
    # Over several steps AdamW magnifies rounding differences in near-zero gradients, so losses agree less tightly.
    assert ta.fit().losses == pytest.approx(tb.fit().losses, rel=1e-4)


def _with_dropout(seed: int = 0) -> nn.Module:
    model = make_tiny_model(seed=seed)  # dropout on: resume must restore the RNG states too
    model.set_trainable(TrainableParts.all())
    return model


def test_resume_is_exact(tmp_path, monkeypatch):
    straight = _with_dropout()
    r_all = Trainer(straight, config(tmp_path / "s", max_steps=6, save_every_steps=3), ToyDataset(), collate).fit()

    killed = Trainer(_with_dropout(), config(tmp_path / "r", max_steps=6, save_every_steps=3), ToyDataset(), collate)
    real_step = killed._step

    def step_then_die(micro):
        if killed.position.global_step == 4:
            raise KeyboardInterrupt("killed")
        return real_step(micro)

    monkeypatch.setattr(killed, "_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert ckpt.find_latest(tmp_path / "r").name == "checkpoint-00000003"

    torch.manual_seed(123)  # another RNG state and another init: both must come from the checkpoint
    model = _with_dropout(seed=5)
    trainer = Trainer(model, config(tmp_path / "r", max_steps=6, resume="auto"), ToyDataset(), collate)
    assert trainer.resume() is not None
    r2 = trainer.fit()
    assert r_all.losses[3:] == r2.losses
    for key, value in trainable(straight).items():
        assert torch.equal(value, trainable(model)[key]), key


def test_resume_refuses_another_global_batch_or_other_trainable_parts(tmp_path):
    from minigpt4qwen.checkpoint.keymap import CheckpointError

    run(tmp_path, tiny(TrainableParts()), max_steps=2, save_every_steps=2)
    model = tiny(TrainableParts())
    before = trainable(model)
    other_batch = Trainer(model, config(tmp_path, max_steps=4, resume="auto", grad_accum=1), ToyDataset(), collate)
    with pytest.raises(CheckpointError, match="4 samples per optimizer step, this run has 2"):
        other_batch.resume()
    assert all(torch.equal(v, trainable(model)[k]) for k, v in before.items())  # refused before loading
    more_parts = Trainer(tiny(TrainableParts(qformer=True)), config(tmp_path, max_steps=4, resume="auto"),
                         ToyDataset(), collate)
    with pytest.raises(CheckpointError, match="lacks .* trainable weights, e.g. .'qformer"):
        more_parts.resume()
    same = Trainer(tiny(TrainableParts()), config(tmp_path, max_steps=4, resume="auto"), ToyDataset(), collate)
    assert same.resume() is not None and same.position.global_batch == 4


def test_frozen_parameters_untouched_and_in_eval(tmp_path):
    model = tiny(TrainableParts())  # the original recipe: only the projection trains
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    modes = []
    model.qformer.register_forward_hook(lambda m, i, o: modes.append((m.training, model.language_projection.training)))
    run(tmp_path, model, max_steps=2)
    assert modes and all(q is False and proj is True for q, proj in modes)
    for key, p in model.named_parameters():
        if key.startswith("language_projection"):
            assert not torch.equal(p, before[key]), key
        else:
            assert torch.equal(p, before[key]), key


def test_nan_batch_is_skipped_and_reported(tmp_path):
    ds = ToyDataset(16, nan_index=0)
    model, result = run(tmp_path, dataset=ds, micro_batch_size=1, grad_accum=1, max_steps=16, epochs=1)
    assert len(result.skipped_steps) == 1
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == result.skipped_steps


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    from minigpt4qwen.training.trainer import NonFiniteError

    ds = ToyDataset(4, nan_index=0)
    ds.items = [ds.items[0]] * 4
    with pytest.raises(NonFiniteError):
        run(tmp_path, dataset=ds, micro_batch_size=1, grad_accum=1, max_steps=4, max_nonfinite_steps=2)


def test_fp16_overflow_skips_are_not_non_finite_steps(tmp_path, monkeypatch):
    from minigpt4qwen.training import trainer as trainer_module

    def overflowing(out, max_steps):
        model = tiny(TrainableParts())
        model.language_projection.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
        return Trainer(model, config(out, precision="fp16", max_steps=max_steps, max_nonfinite_steps=2),
                       ToyDataset(), collate)  # finite losses, infinite gradients: fp16 overflow every step

    result = overflowing(tmp_path / "a", 3).fit()
    assert result.skipped_steps == [1, 2, 3]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if r.get("skipped")] == ["overflow"] * 3
    monkeypatch.setattr(trainer_module, "MAX_OVERFLOW_RUN", 2)
    with pytest.raises(trainer_module.NonFiniteError, match="3 fp16 overflows in a row"):
        overflowing(tmp_path / "b", 5).fit()


def test_interrupted_save_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    model, _ = run(tmp_path, max_steps=2, save_every_steps=1, keep_last=1)
    good = ckpt.find_latest(tmp_path)
    assert good.name == "checkpoint-00000002"
    good_weights = (good / "model.safetensors").read_bytes()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", dies)
    trainer = Trainer(model, config(tmp_path, max_steps=2), ToyDataset(), collate)
    trainer.position.global_step = 2  # rewrite the same directory: the old one must survive
    with pytest.raises(KeyboardInterrupt):
        trainer.save(_NullLogger())
    (tmp_path / ".checkpoint-00000003.tmp-dead").mkdir()  # a hard kill's leftover is ignored
    assert ckpt.find_latest(tmp_path) == good
    assert (good / "model.safetensors").read_bytes() == good_weights
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p.name != ".checkpoint-00000003.tmp-dead"]


class _NullLogger:
    def log(self, record, step):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world)
    # The published recipe (projection only): every trained weight has a real gradient, so Adam's sign-like
    # first steps cannot amplify summation-order noise and the weights themselves can be compared.
    model = tiny(TrainableParts())
    trainer = Trainer(wrap_ddp(model, info), config(Path(out), micro_batch_size=2, grad_accum=1, max_steps=3),
                      ToyDataset(), collate, info=info)
    first_loss, grads = first_step_grads(trainer)
    result = trainer.fit()
    if rank == 0:
        torch.save({"first": (first_loss, grads), "losses": result.losses, "weights": trainable(model)},
                   Path(out) / "ddp.pt")
    trainer = None  # free DDP's reducer before its process group (as train_main does): see training/entry.py
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2)
    got = torch.load(tmp_path / "ddp" / "ddp.pt")
    model = tiny(TrainableParts())
    single = Trainer(model, config(tmp_path / "one", micro_batch_size=2, grad_accum=2, max_steps=3), ToyDataset(),
                     collate)
    loss, grads = first_step_grads(single)
    assert got["first"][0] == pytest.approx(loss, rel=1e-6)
    assert_same_grads(got["first"][1], grads)
    assert got["losses"] == pytest.approx(single.fit().losses, rel=1e-5)
    weights = trainable(model)
    assert weights.keys() == got["weights"].keys()
    for key in weights:
        torch.testing.assert_close(got["weights"][key], weights[key], rtol=1e-5, atol=1e-6, msg=key)


def test_length_grouped_plan_is_deterministic_and_groups_lengths():
    lengths = [int(x) for x in torch.randint(10, 500, (400,), generator=torch.Generator().manual_seed(0))]
    plan = epoch_plan(400, 8, seed=3, epoch=1, lengths=lengths)
    assert plan == epoch_plan(400, 8, seed=3, epoch=1, lengths=lengths)
    assert plan != epoch_plan(400, 8, seed=3, epoch=2, lengths=lengths)
    flat = [i for batch in plan for i in batch]
    assert len(flat) == len(set(flat)) == 400 and all(len(b) == 8 for b in plan)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan) / len(plan)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                        for b in epoch_plan(400, 8, seed=3, epoch=1)) / len(plan)
    assert spread < random_spread / 4  # less padding in every batch

