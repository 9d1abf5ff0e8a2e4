"""DeepSpeed ZeRO-0/1/2/3 on 2 CPU processes equal the plain trainer; resume is exact; checkpoints convert.

One `torchrun --nproc_per_node 2` run (the `__main__` block below) trains every scenario and saves what the
tests compare; the single-process references run in the pytest process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from minigpt4qwen.checkpoint.assemble import _checkpoint_lora  # noqa: E402
from minigpt4qwen.checkpoint.deepspeed_convert import RUN_CONFIG, convert_to_native  # noqa: E402
from minigpt4qwen.checkpoint.keymap import CheckpointError, load_checked  # noqa: E402
from minigpt4qwen.checkpoint.native import lora_description, read_native_checkpoint  # noqa: E402
from minigpt4qwen.config import to_yaml  # noqa: E402
from minigpt4qwen.model.parts import TrainableParts  # noqa: E402
from minigpt4qwen.training.config import LoraConfig, RunConfig, TrainConfig  # noqa: E402
from minigpt4qwen.training.lora import apply_lora  # noqa: E402
from minigpt4qwen.training.trainer import Trainer  # noqa: E402
from tests.test_trainer import ToyDataset, collate, config, tiny, trainable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = (0, 1, 2, 3)
STEPS = 4
# 2 processes x micro-batch 2 x accumulation 2 = the reference's 1 process x 2 x 4.
DS_BATCH = dict(micro_batch_size=2, grad_accum=2)
REF_BATCH = dict(micro_batch_size=2, grad_accum=4)
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def lora_model():
    """The tiny model with the projection and LoRA adapters on its frozen LLM trainable."""
    model = tiny(TrainableParts())
    apply_lora(model, LORA)
    return model


def launch(module: str, out: Path, timeout: int = 300) -> None:
    """Runs `python -m module out` under torchrun with 2 CPU processes; fails the test with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", module, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero")
    launch("tests.test_deepspeed", out)
    return out, torch.load(out / "results.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The plain trainer on the same data and global batch: losses and final weights, all parts trained / projection."""
    out = tmp_path_factory.mktemp("ref")
    results = {}
    for name, parts in (("all", None), ("projection", TrainableParts())):
        model = tiny(parts)
        result = Trainer(model, config(out / name, max_steps=STEPS, **REF_BATCH), ToyDataset(), collate).fit()
        results[name] = (result.losses, trainable(model))
    return results


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_plain_trainer(ds_run, reference, stage):
    _, results = ds_run
    losses, weights = results[f"zero{stage}"]
    ref_losses, ref_weights = reference["all"]
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    # Every ZeRO stage ends on ZeRO-0's weights; against the single process, AdamW turns rounding differences
    # in near-zero gradients into whole lr-sized steps (see test_trainer), so only lr-scale agreement holds.
    zero0 = results["zero0"][1]
    for key, value in ref_weights.items():
        assert torch.allclose(weights[key], zero0[key], atol=1e-6), key
        assert (weights[key] - value).abs().max() < 5e-3, key


def test_frozen_llm_zero2_matches_and_saves_only_trainable(ds_run, reference):
    out, results = ds_run
    losses, weights = results["frozen"]
    ref_losses, ref_weights = reference["projection"]
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert set(weights) == set(ref_weights) == {"language_projection.weight", "language_projection.bias"}
    converted = read_native_checkpoint(convert_to_native(out / "frozen", out / "frozen_native"))
    assert set(converted) == set(ref_weights)  # exclude_frozen_parameters: nothing of the frozen parts
    for key, value in weights.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("stage", (2, 3))
def test_resume_continues_identically(ds_run, stage):
    _, results = ds_run
    straight, _ = results[f"zero{stage}"]
    resumed, _ = results[f"resumed{stage}"]
    assert resumed == straight[2:]


@pytest.mark.parametrize("stage", STAGES)
def test_conversion_round_trip(ds_run, stage, tmp_path):
    out, results = ds_run
    _, weights = results[f"zero{stage}"]
    converted = read_native_checkpoint(convert_to_native(out / f"zero{stage}", tmp_path / "native"))
    assert set(converted) == set(weights)
    for key, value in weights.items():
        assert torch.equal(converted[key], value), key
    projection = read_native_checkpoint(convert_to_native(out / f"zero{stage}", tmp_path / "proj",
                                                          parts=["language_projection"]))
    assert set(projection) == {"language_projection.weight", "language_projection.bias"}


def test_resume_refuses_other_trainable_parts_and_another_global_batch(ds_run):
    _, results = ds_run
    assert "lacks 102 trainable weights, e.g. ['language_model." in results["more_parts"]
    assert "8 samples per optimizer step, this run has 4" in results["other_batch"]


def test_lora_checkpoint_converts_with_the_runs_lora_settings_and_loads(ds_run, tmp_path):
    out, results = ds_run
    _, weights = results["lora"]
    native = convert_to_native(out / "lora", tmp_path / "native")
    settings = _checkpoint_lora(str(native))  # what model.checkpoint= rebuilds the adapters from
    assert settings == lora_description(lora_model())  # as a native LoRA save records them
    converted = read_native_checkpoint(native)
    assert set(converted) == set(weights) and any("lora_B" in k for k in converted)
    for key, value in weights.items():
        assert torch.equal(converted[key], value), key
    fresh = tiny(TrainableParts())
    apply_lora(fresh, LoraConfig(**settings))
    load_checked(fresh, converted, source=str(native), allow_missing=True)
    for key, param in fresh.named_parameters():
        if key in weights:
            assert torch.equal(param, weights[key]), key


@pytest.mark.parametrize("config", ["missing", "lora disabled"])
def test_lora_checkpoint_without_the_runs_lora_settings_is_refused(ds_run, tmp_path, config):
    out, _ = ds_run
    tag = tmp_path / "run" / "checkpoint-00000004"
    shutil.copytree(out / "lora" / tag.name, tag)
    if config == "missing":
        expected = rf"{tmp_path / 'run' / RUN_CONFIG} is missing: the checkpoint {tag} holds LoRA adapters"
    else:
        (tag.parent / RUN_CONFIG).write_text(to_yaml(RunConfig()))
        expected = rf"{tmp_path / 'run' / RUN_CONFIG}: no train.lora with enabled: true"
    with pytest.raises(CheckpointError, match=expected):
        convert_to_native(tag, tmp_path / "native")
    assert not (tmp_path / "native").exists()


def _final_weights(trainer) -> dict[str, torch.Tensor]:
    """The trained parameters, gathered from their ZeRO-3 partitions where needed."""
    import deepspeed

    params = dict(trainer.engine.module.named_parameters())
    wanted = {k: p for k, p in params.items() if p.requires_grad}
    zero3 = trainer.engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(wanted.values()), enabled=zero3):
        return {k.replace("_checkpoint_wrapped_module.", ""): p.detach().clone() for k, p in wanted.items()}


def _worker(out: Path) -> None:
    from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer
    from minigpt4qwen.training.distributed import DistInfo, destroy, init_distributed
    from minigpt4qwen.training.parallel_config import ParallelConfig

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)
    results = {}

    def train(name: str, stage: int, parts=None, model=None, config_yaml=None, **kw):
        parallel = ParallelConfig(engine="deepspeed", zero_stage=stage)
        cfg = config(out / name, max_steps=STEPS, **{**DS_BATCH, **kw})
        trainer = DeepSpeedTrainer(model or tiny(parts), cfg, ToyDataset(), collate, info=info, parallel=parallel,
                                   config_yaml=config_yaml)
        trainer.resume()
        return trainer.fit().losses, _final_weights(trainer)

    for stage in STAGES:
        results[f"zero{stage}"] = train(f"zero{stage}", stage, save_every_steps=2)
    for stage in (2, 3):  # continue from the step-2 checkpoint into another directory
        source = out / f"zero{stage}" / "checkpoint-00000002"
        results[f"resumed{stage}"] = train(f"resumed{stage}", stage, resume=str(source))
    results["frozen"] = train("frozen", 2, TrainableParts())
    # The trainer saves the run's config.yaml beside the checkpoints, as `minigpt4qwen train` does.
    results["lora"] = train("lora", 2, model=lora_model(), config_yaml=to_yaml(RunConfig(train=TrainConfig(lora=LORA))))
    refusals = {"more_parts": (None, out / "frozen" / "checkpoint-00000004", {}),
                "other_batch": (None, out / "zero2" / "checkpoint-00000002", {"grad_accum": 1})}
    for name, (parts, source, kw) in refusals.items():
        try:
            train(name, 2, parts, resume=str(source), **kw)
            results[name] = "resumed"
        except CheckpointError as err:
            results[name] = str(err)
    if info.is_main:
        torch.save(results, out / "results.pt")
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
