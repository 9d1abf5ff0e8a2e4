"""Text-only batches with only the projection trained (issue 18), under the plain trainer, DDP, ZeRO-0..3 and the
pipeline: the step counts (loss logged, tokens, schedule, resume), the projection is left alone unless another
micro-batch or rank of the step held an image, and DDP does not hang when one rank has none.

Two datasets of 24 samples, 3 optimizer steps of 8 samples: "all_text" (every sample text-only) and "mixed", where
step 0 has images in its first micro-batch of 2 only (rank 0 of 2 under data parallelism; rank 1 has none),
step 1 is text-only throughout and step 2 is all images. One `torchrun` run (the `__main__` block) trains every
engine; the references (by hand, and the plain trainer) are computed here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt4qwen.data.sampler import epoch_plan
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training.trainer import Trainer
from tests.conftest import NUM_QUERIES
from tests.test_deepspeed import launch
from tests.test_trainer import ToyDataset, collate, config, tiny, trainable

N, STEPS, SEED = 24, 3, 42
# No warm-up (its first lr is 0) and no clipping (the recorded gradients are compared with unclipped ones).
REF_BATCH = dict(micro_batch_size=2, grad_accum=4, warmup_steps=0, grad_clip=0.0)  # one process, global batch 8
DIST_BATCH = dict(micro_batch_size=2, grad_accum=2, warmup_steps=0, grad_clip=0.0)  # 2 data-parallel processes
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = ("ddp", *(("zero0", "zero1", "zero2", "zero3", "pipeline") if HAS_DEEPSPEED else ()))
PROJECTION = ("language_projection.weight", "language_projection.bias")


def text_only_indices(kind: str) -> set[int]:
    plan = epoch_plan(N, 8, SEED, 0)
    return set(range(N)) if kind == "all_text" else {*plan[0][2:], *plan[1]}


def dataset(kind: str) -> ToyDataset:
    """ToyDataset with the chosen samples made text-only: no placeholders, no pixels."""
    ds = ToyDataset(N)
    for i in text_only_indices(kind):
        ids, _, pixels = ds.items[i]
        text = torch.cat([ids[:1], ids[1 + NUM_QUERIES :]])
        labels = text.clone()
        labels[0] = -100
        ds.items[i] = (text, labels, pixels[:0])
    return ds


def hand_text_loss(model, items) -> tuple[float, int]:
    """The mean next-token loss of text-only samples, from the LLM alone, and their supervised tokens."""
    total, tokens = 0.0, 0
    for ids, labels, _ in items:
        with torch.no_grad():
            logits = model.language_model(input_ids=ids[None]).logits[0, :-1].double()
        keep = labels[1:] != -100
        total += float(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
        tokens += int(keep.sum())
    return total / tokens, tokens


def hand_losses(model, ds) -> list[tuple[float, int]]:
    """(loss, tokens) of each step of a text-only dataset, by hand."""
    return [hand_text_loss(model, [ds[i] for i in batch]) for batch in epoch_plan(N, 8, SEED, 0)[:STEPS]]


def record_steps(trainer: Trainer, model) -> list[dict]:
    """Per optimizer step: the gradient the optimizer sees (after the image-free guard) and the trained weights
    after the step (only where our AdamW holds the model's own parameters: not under ZeRO-1..3)."""
    steps: list[dict] = []
    named = {id(p): k for k, p in model.named_parameters()}

    def before(optimizer, args, kwargs):
        grads = {named[id(p)]: None if p.grad is None else p.grad.clone()
                 for g in optimizer.param_groups for p in g["params"] if id(p) in named}
        steps.append({"grads": grads})

    def after(optimizer, args, kwargs):
        steps[-1]["weights"] = trainable(model)

    trainer.optimizer.register_step_pre_hook(before)
    trainer.optimizer.register_step_post_hook(after)
    return steps


def projection_of(weights: dict) -> dict:
    return {k.split("language_projection.")[-1]: v for k, v in weights.items() if "language_projection." in k}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The plain trainer, one process, on each dataset: losses, per-step records, final weights, metrics."""
    out, results = tmp_path_factory.mktemp("ref"), {}
    for kind in ("all_text", "mixed"):
        model = tiny(TrainableParts())
        trainer = Trainer(model, config(out / kind, max_steps=STEPS, **REF_BATCH), dataset(kind), collate)
        steps = record_steps(trainer, model)
        result = trainer.fit()
        metrics = [json.loads(x) for x in (out / kind / "metrics.jsonl").read_text().splitlines()]
        results[kind] = {"losses": result.losses, "steps": steps, "weights": trainable(model),
                         "metrics": [m for m in metrics if m["kind"] == "train"]}
    return results


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_text_only_steps_count_and_leave_the_projection_alone(tmp_path, precision):
    model, ds = tiny(TrainableParts()), dataset("all_text")
    before = trainable(model)
    trainer = Trainer(model, config(tmp_path, max_steps=STEPS, precision=precision, save_every_steps=1, **REF_BATCH),
                      ds, collate)
    result = trainer.fit()
    hand = hand_losses(model, ds)
    tolerance = 1e-6 if precision == "fp32" else 1e-2
    assert result.losses == pytest.approx([loss for loss, _ in hand], rel=tolerance) and not result.skipped_steps
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["tokens"] for r in train] == [tokens for _, tokens in hand]
    assert [r["loss"] for r in train] == result.losses and [r["grad_norm"] for r in train] == [0.0] * STEPS
    for key, value in before.items():
        assert torch.equal(trainable(model)[key], value), key
    assert not trainer.optimizer.state  # AdamW never stepped the projection: no moments, no weight decay
    assert trainer.scheduler.last_epoch == STEPS and trainer.position.global_step == STEPS
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [1, 2, 3]


def test_mixed_steps_match_the_hand_reference(reference):
    ref, initial, ds = reference["mixed"], tiny(TrainableParts()), dataset("mixed")
    plan = epoch_plan(N, 8, SEED, 0)
    # Step 0: the gradient comes from the first micro-batch (its images), divided by all 8 samples' tokens.
    tokens = sum(int((ds[i][1][1:] != -100).sum()) for i in plan[0])
    out = initial.train()(**collate([ds[i] for i in plan[0][:2]]))
    (out.loss_sum / tokens).backward()
    for key, grad in projection_of(ref["steps"][0]["grads"]).items():
        torch.testing.assert_close(grad, getattr(initial.language_projection, key).grad, rtol=1e-5, atol=1e-8)
    # Step 1 holds no image: no gradient reaches the optimizer and the projection stays bitwise where it was.
    assert all(g is None for g in ref["steps"][1]["grads"].values())
    for key in PROJECTION:
        assert torch.equal(ref["steps"][1]["weights"][key], ref["steps"][0]["weights"][key])
        assert not torch.equal(ref["steps"][2]["weights"][key], ref["steps"][1]["weights"][key])
    assert ref["losses"][1] == pytest.approx(hand_text_loss(initial, [ds[i] for i in plan[1]])[0], rel=1e-6)


@pytest.mark.parametrize("checkpoint", [1, 2])  # before and after the text-only step
def test_resume_across_a_text_only_step_is_exact(tmp_path, reference, checkpoint):
    straight = Trainer(tiny(TrainableParts()), config(tmp_path / "a", max_steps=STEPS, save_every_steps=1,
                                                      **REF_BATCH), dataset("mixed"), collate)
    losses = straight.fit().losses
    model = tiny(TrainableParts())
    source = tmp_path / "a" / f"checkpoint-{checkpoint:08d}"
    resumed = Trainer(model, config(tmp_path / "b", max_steps=STEPS, resume=str(source), **REF_BATCH),
                      dataset("mixed"), collate)
    resumed.resume()
    assert resumed.fit().losses == losses[checkpoint:]
    for key, value in trainable(straight.model).items():
        assert torch.equal(trainable(model)[key], value), key


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engines")
    launch("tests.test_text_only_batches", out)  # a hang fails here: the workers' process group times out
    return torch.load(out / "results.pt")


@pytest.mark.parametrize("engine", ENGINES)
def test_text_only_steps_under_each_engine(engines, reference, engine):
    got, initial = engines[f"{engine}/all_text"], tiny(TrainableParts())
    hand = hand_losses(initial, dataset("all_text"))
    assert got["losses"] == pytest.approx([loss for loss, _ in hand], rel=1e-6)
    assert [r["tokens"] for r in got["metrics"]] == [tokens for _, tokens in hand]
    initial = trainable(initial)
    for key in PROJECTION:
        assert torch.equal(got["weights"][key], initial[key]), key
    assert got["optimizer_state"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_mixed_steps_under_each_engine_match_one_process(engines, reference, engine):
    got, ref = engines[f"{engine}/mixed"], reference["mixed"]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    for key in PROJECTION:
        torch.testing.assert_close(got["weights"][key], ref["weights"][key], rtol=1e-5, atol=1e-6, msg=key)
    if engine in ("ddp", "zero0", "pipeline"):  # our AdamW holds the real parameters: per-step records
        for step, ref_step in zip(got["steps"], ref["steps"], strict=True):
            for key in PROJECTION:
                torch.testing.assert_close(step["weights"][key], ref_step["weights"][key], rtol=1e-5, atol=1e-6)
        assert all(g is None for g in got["steps"][1]["grads"].values())  # the text-only step
    if "ranks" in got:  # DDP: rank 1 had no image in step 0, yet both ranks hold the same all-reduced gradient
        rank0, rank1 = got["ranks"]
        for key in PROJECTION:
            assert torch.equal(rank0[0]["grads"][key], rank1[0]["grads"][key])
            torch.testing.assert_close(rank0[0]["grads"][key], ref["steps"][0]["grads"][key], rtol=1e-5, atol=1e-8)


def _worker(out: Path) -> None:
    from minigpt4qwen.training.distributed import DistInfo, all_gather_objects, destroy, init_distributed, wrap_ddp

    torch.set_num_threads(1)
    # A short collective timeout: a rank waiting for a gradient the other never sends fails instead of hanging.
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)
    results = {}

    def build(engine: str, kind: str):
        model, cfg = tiny(TrainableParts()), config(out / f"{engine}_{kind}", max_steps=STEPS, **DIST_BATCH)
        if engine == "ddp":
            return model, Trainer(wrap_ddp(model, info), cfg, dataset(kind), collate, info=info)
        from minigpt4qwen.training.parallel_config import ParallelConfig

        if engine == "pipeline":  # PP=2: one replica, so its accumulation doubles to the same global batch
            from minigpt4qwen.training.pipeline import PipelineTrainer

            cfg = config(out / f"{engine}_{kind}", max_steps=STEPS, **REF_BATCH)
            return model, PipelineTrainer(model, cfg, dataset(kind), collate, info=info,
                                          parallel=ParallelConfig(engine="pipeline", num_stages=2))
        from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer

        parallel = ParallelConfig(engine="deepspeed", zero_stage=int(engine[-1]))
        return model, DeepSpeedTrainer(model, cfg, dataset(kind), collate, info=info, parallel=parallel)

    for engine in ENGINES:
        for kind in ("all_text", "mixed"):
            model, trainer = build(engine, kind)
            steps = record_steps(trainer, model) if engine in ("ddp", "zero0", "pipeline") else []
            losses = trainer.fit().losses
            if engine.startswith("zero"):
                from tests.test_deepspeed import _final_weights

                weights = _final_weights(trainer)
            else:
                weights = trainable(model)  # pipeline: rank 0 is the first stage, which holds the projection
            metrics = out / f"{engine}_{kind}" / "metrics.jsonl"
            # Non-empty AdamW states (DeepSpeed's checkpointing adds empty ones for the partitions it saves).
            record = {"losses": losses, "weights": weights, "steps": steps,
                      "optimizer_state": sum(bool(s) for s in trainer.optimizer.state.values())}
            if info.is_main:
                record["metrics"] = [r for r in map(json.loads, metrics.read_text().splitlines())
                                     if r["kind"] == "train"]
            if engine == "ddp":
                record["ranks"] = all_gather_objects(steps)
            results[f"{engine}/{kind}"] = record
    if info.is_main:
        torch.save(results, out / "results.pt")
    model = trainer = None  # the DDP reducer goes before the process group (see distributed.destroy)
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
