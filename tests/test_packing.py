"""Padding-free packing (data.packing): the same loss and gradients as padded batches, images on their own samples,
deterministic rows and micro-batches, exact accumulation, resume, DDP and ZeRO; the engines that cannot take it
say so.

The distributed scenarios run in one `torchrun --nproc_per_node 2` launch (the `__main__` block below); the
single-process references run in the pytest process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.data.packing import PackingCollator, default_pack_length, pack_rows
from minigpt4qwen.data.sampler import balance_micro_batches, epoch_plan
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training import state as ckpt
from minigpt4qwen.training.config import RunConfig
from minigpt4qwen.training.trainer import Trainer
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_model
from tests.test_cli_train import project  # noqa: F401 (a fixture: a tiny project in the real file formats)
from tests.test_trainer import assert_same_grads, config, first_step_grads, tiny, trainable

PAD, IGNORE = 0, -100


def make_sample(g: torch.Generator, images: int, text: int, answer: int, learn_first: bool = False) -> dict:
    """A dataset item: header, `images` placeholder runs, a question, a learned answer (ids 6..63)."""
    words = lambda n: torch.randint(6, 64, (n,), generator=g)  # noqa: E731
    parts = [torch.tensor([2])] + [torch.full((NUM_QUERIES,), IMAGE_TOKEN_ID)] * images + [words(text)]
    prompt = torch.cat(parts)
    reply = words(answer)
    labels = torch.cat([torch.full_like(prompt, IGNORE), reply])
    if learn_first:  # label_mode "original" learns the opening token too: it must never become a target
        labels[0] = prompt[0]
    return {"input_ids": torch.cat([prompt, reply]), "labels": labels,
            "pixel_values": torch.randn(images, 3, 28, 28, generator=g), "events": [], "problems": []}


class PackToy(torch.utils.data.Dataset):
    """Samples of 1-2 images (0-2 `with_text_only`) and 8-37 tokens."""

    def __init__(self, n: int = 24, seed: int = 0, with_text_only: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            images = i % 3 if with_text_only else 1 + i % 2
            text, answer = (int(torch.randint(low, high, (1,), generator=g)) for low, high in ((1, 12), (2, 18)))
            self.items.append(make_sample(g, images, text, answer, learn_first=i % 4 == 0))
        self.lengths = [len(s["input_ids"]) for s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")
              if k in batch}
    out = model(**inputs)
    out.loss_sum.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss_sum.detach(), out.num_tokens, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_length", [0, 48])
def test_packed_loss_and_gradients_equal_the_padded_batch(attention, pack_length):
    model = make_tiny_model()
    with torch.no_grad():  # a random tiny image path barely tells images apart: make their features differ
        for name, param in model.named_parameters():
            if not name.startswith("language_model.") and (param.dim() > 1 or "embeddings" in name):
                param.normal_(0, 0.3)
    model.set_trainable(TrainableParts.all())
    model.language_model.set_attn_implementation(attention)
    samples = PackToy(7, seed=1, with_text_only=True).items
    padded = DataCollator(PAD)(samples)
    packed = PackingCollator(PAD, pack_length)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(samples)
    assert packed["num_label_tokens"] == padded["num_label_tokens"]
    ref_loss, ref_tokens, ref_grads = loss_and_grads(model, padded)
    loss, tokens, grads = loss_and_grads(model, packed)
    assert tokens == ref_tokens
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads, ref_grads)
    # The same checks fail for attention across samples or images on another sample's placeholders.
    leaking = {**packed, "position_ids": None}
    swapped = {**packed, "pixel_values": packed["pixel_values"].roll(1, dims=0)}
    for wrong in (leaking, swapped):
        wrong_loss, _, wrong_grads = loss_and_grads(model, wrong)
        assert not torch.allclose(wrong_loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert (wrong_grads - ref_grads).norm() / ref_grads.norm() > 1e-3


def test_rows_positions_labels_and_images_follow_the_samples():
    g = torch.Generator().manual_seed(0)
    samples = [make_sample(g, 1, 3, 4, learn_first=True), make_sample(g, 0, 2, 3), make_sample(g, 2, 1, 5)]
    lengths = [len(s["input_ids"]) for s in samples]  # 12, 6, 15
    assert pack_rows(lengths, 0) == [[0, 1, 2]]
    assert pack_rows(lengths, 18) == [[2], [0, 1]]  # longest first, each into the first row with room
    with pytest.raises(ValueError, match="does not fit data.pack_length = 14"):
        pack_rows(lengths, 14)
    batch = PackingCollator(PAD, pack_length=18, pad_to_multiple_of=8)(samples)
    assert batch["input_ids"].shape == (2, 24)
    assert batch["position_ids"][0].tolist() == [*range(15), *range(9)]  # the padding tail restarts too
    assert batch["position_ids"][1].tolist() == [*range(12), *range(6), *range(6)]
    assert torch.equal(batch["input_ids"][1, 12:18], samples[1]["input_ids"])
    assert (batch["input_ids"][0, 15:] == PAD).all() and (batch["labels"][0, 15:] == IGNORE).all()
    assert batch["labels"][1, 0] == IGNORE and batch["labels"][1, 12] == IGNORE  # first labels never targets
    # Images in row order: the two of sample 2 (row 0), then sample 0's.
    expected = torch.cat([samples[2]["pixel_values"], samples[0]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["num_images"].tolist() == [1, 0, 2]
    assert batch["num_label_tokens"] == DataCollator(PAD)(samples)["num_label_tokens"]


def test_micro_batches_are_balanced_deterministically():
    lengths = [int(x) for x in torch.randint(20, 400, (64,), generator=torch.Generator().manual_seed(0))]
    batch = epoch_plan(64, 32, seed=1, epoch=0)[0]
    balanced = balance_micro_batches(batch, lengths, 4)
    assert balanced == balance_micro_batches(batch, lengths, 4) and sorted(balanced) == sorted(batch)
    totals = lambda order: [sum(lengths[i] for i in order[k : k + 4]) for k in range(0, 32, 4)]  # noqa: E731
    assert max(totals(balanced)) - min(totals(balanced)) < (max(totals(batch)) - min(totals(batch))) / 4
    first = balanced[:4]
    assert first == sorted(first, key=batch.index)  # a micro-batch keeps the batch's order
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        balance_micro_batches(batch, lengths, 5)


def packed_trainer(out: Path, model: nn.Module | None = None, **kw) -> Trainer:
    data = PackToy()
    return Trainer(model or tiny(), config(out, **kw), data, PackingCollator(PAD), packed_lengths=data.lengths)


def test_packed_training_equals_padded_over_accumulation(tmp_path):
    padded = Trainer(tiny(), config(tmp_path / "a", micro_batch_size=2, grad_accum=4, max_steps=3), PackToy(),
                     DataCollator(PAD))
    packed = packed_trainer(tmp_path / "b", micro_batch_size=2, grad_accum=4, max_steps=3)
    (loss_a, grads_a), (loss_b, grads_b) = first_step_grads(padded), first_step_grads(packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert_same_grads(grads_b, grads_a)
    one_micro_batch = packed_trainer(tmp_path / "c", micro_batch_size=8, grad_accum=1, max_steps=3)
    loss_c, grads_c = first_step_grads(one_micro_batch)
    assert loss_c == pytest.approx(loss_a, rel=1e-6)
    assert_same_grads(grads_c, grads_a)
    assert packed.fit().losses == pytest.approx(padded.fit().losses, rel=1e-4)


def test_packed_resume_is_exact(tmp_path, monkeypatch):
    def with_dropout(seed: int = 0) -> nn.Module:
        model = make_tiny_model(seed=seed)
        model.set_trainable(TrainableParts.all())
        return model

    straight = with_dropout()
    all_losses = packed_trainer(tmp_path / "s", straight, max_steps=5, save_every_steps=2).fit().losses
    killed = packed_trainer(tmp_path / "r", with_dropout(), max_steps=5, save_every_steps=2)
    real_step = killed._step

    def step_then_die(micro):
        if killed.position.global_step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(micro)

    monkeypatch.setattr(killed, "_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert ckpt.find_latest(tmp_path / "r").name == "checkpoint-00000002"
    model = with_dropout(seed=3)
    resumed = packed_trainer(tmp_path / "r", model, max_steps=5, resume="auto")
    assert resumed.resume() is not None
    assert resumed.fit().losses == all_losses[2:]
    for key, value in trainable(straight).items():
        assert torch.equal(value, trainable(model)[key]), key


def test_train_command_with_packing_logs_the_padded_runs_losses(project, tmp_path, monkeypatch):  # noqa: F811
    from minigpt4qwen.cli.main import main

    rows = []
    collate = PackingCollator.__call__

    def spy(self: PackingCollator, samples: list[dict]) -> dict:
        batch = collate(self, samples)
        rows.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(PackingCollator, "__call__", spy)

    def losses(run: Path, *overrides: str) -> list[float]:
        torch.manual_seed(0)  # the fresh projection: the same in both runs
        assert main(["train", str(project / "train.yaml"), f"train.output_dir={run}", "train.max_steps=3",
                     "train.log_every=1", *overrides]) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r.get("kind") == "train"]

    padded = losses(tmp_path / "padded")
    assert len(padded) == 3
    assert not rows
    packed = losses(tmp_path / "packed", "data.packing=true", "data.pad_to_multiple_of=8")
    assert packed == pytest.approx(padded, rel=1e-5)
    assert len(rows) == 3 and all(r == 1 and width % 8 == 0 for r, width in rows)


def test_attention_that_cannot_take_packed_rows_is_a_config_error(tmp_path):
    spec = [DatasetSpec("minigpt4qwen", "train.json", ".")]
    pipeline = RunConfig(data=DataConfig(datasets=spec, packing=True))
    pipeline.parallel.engine = "pipeline"
    pipeline.validate()  # its stages pass the positions along (tests/test_pipeline.py)
    flash = RunConfig(data=DataConfig(datasets=spec, packing=True, pack_length=512))
    flash.model.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2 takes one packed row"):
        flash.validate()
    flash.data.pack_length = None
    flash.validate()
    # Unset, the row length follows the attention: one row where the kernel skips across-sample work.
    assert default_pack_length("flash_attention_2", 256) == default_pack_length("flex_attention", 256) == 0
    assert default_pack_length("sdpa", 256) == default_pack_length("eager", 256) == 512
    with pytest.raises(ValueError, match="pack_length = 100 is below data.max_txt_len = 256"):
        DataConfig(datasets=spec, packing=True, pack_length=100).validate()


# ------------------------------------------------------------------ DDP and ZeRO: 2 CPU processes, one launch
STEPS = 3
DIST_BATCH = dict(micro_batch_size=2, grad_accum=2)  # x 2 processes = the reference's 1 x 2 x 4


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> dict:
    from tests.test_deepspeed import launch

    out = tmp_path_factory.mktemp("packed_dist")
    launch("tests.test_packing", out)
    return torch.load(out / "results.pt")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[list[float], dict]:
    out = tmp_path_factory.mktemp("packed_ref")
    model = tiny(TrainableParts())
    result = packed_trainer(out, model, max_steps=STEPS, micro_batch_size=2, grad_accum=4).fit()
    return result.losses, trainable(model)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_two_processes_packed_equal_one(dist_run, single_process, engine):
    if engine not in dist_run:
        pytest.skip("deepspeed is not installed")
    losses, weights = dist_run[engine]
    ref_losses, ref_weights = single_process
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for key, value in ref_weights.items():  # projection only: every trained weight has a real gradient
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


def ddp_packed_fit(out: Path, model: nn.Module, info) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Trains `model` STEPS steps on `PackToy` under DDP in this torchrun process: its losses and trained weights."""
    from minigpt4qwen.training.distributed import wrap_ddp

    data = PackToy()
    trainer = Trainer(wrap_ddp(model, info), config(out, max_steps=STEPS, **DIST_BATCH), data, PackingCollator(PAD),
                      info=info, packed_lengths=data.lengths)
    return trainer.fit().losses, trainable(model)  # the trainer (and its DDP reducer) goes before the group


def _worker(out: Path) -> None:
    from minigpt4qwen.training.distributed import DistInfo, destroy, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)
    data = PackToy()
    results = {"ddp": ddp_packed_fit(out / "ddp", tiny(TrainableParts()), info)}
    try:
        from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer
        from minigpt4qwen.training.parallel_config import ParallelConfig
        from tests.test_deepspeed import _final_weights
    except ImportError:
        DeepSpeedTrainer = None
    for stage in (2, 3) if DeepSpeedTrainer else ():
        trainer = DeepSpeedTrainer(tiny(TrainableParts()), config(out / f"zero{stage}", max_steps=STEPS, **DIST_BATCH),
                                   data, PackingCollator(PAD), info=info, packed_lengths=data.lengths,
                                   parallel=ParallelConfig(engine="deepspeed", zero_stage=stage))
        results[f"zero{stage}"] = (trainer.fit().losses, _final_weights(trainer))
    if info.is_main:
        torch.save(results, out / "results.pt")
    trainer = None  # its DDP reducer goes before the process group (see distributed.destroy)
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
