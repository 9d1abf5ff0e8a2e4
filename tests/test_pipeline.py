"""DeepSpeed pipeline (PP=2 on 2 CPU processes) equals one process, LLM frozen and unfrozen, Qwen2 and Llama.

One `torchrun` run (the `__main__` block) trains every scenario, then `minigpt4qwen train` with the pipeline
engine on test_cli_train's tiny project (real file formats); the plain trainer's references run here. Clipping
is set low enough to act on every step, so the pipeline's global gradient norm is compared too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

from minigpt4qwen.checkpoint.assemble import build_model
from minigpt4qwen.checkpoint.deepspeed_convert import convert_to_native
from minigpt4qwen.checkpoint.native import read_native_checkpoint
from minigpt4qwen.cli.main import main as cli_main
from minigpt4qwen.config import load_config
from minigpt4qwen.data.collate import DataCollator
from minigpt4qwen.data.packing import PackingCollator
from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training.config import RunConfig
from minigpt4qwen.training.trainer import Trainer
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES
from tests.test_cli_train import project  # noqa: F401 (a fixture)
from tests.test_deepspeed import launch
from tests.test_packing import PAD, PackToy
from tests.test_trainer import ToyDataset, collate, config, trainable

STEPS = 4
# PP=2 on 2 processes: one data-parallel replica. The frozen runs' gradient norms are ~0.06, the others' ~1.
BATCH = {"micro_batch_size": 2, "grad_accum": 4, "grad_clip": 0.03}
SCENARIOS = {  # name: (family, LLM trained, activation checkpointing, precision)
    "qwen2_unfrozen": ("qwen2", True, False, "fp32"),
    "qwen2_frozen": ("qwen2", False, True, "fp32"),
    "llama_unfrozen": ("llama", True, True, "fp32"),
    "llama_frozen": ("llama", False, False, "fp32"),
    "qwen2_frozen_bf16": ("qwen2", False, False, "bf16"),  # the same autocast as the trainer's: same rounding
}


def tiny_family(family: str, llm_trained: bool) -> nn.Module:
    """A tiny MiniGPT4Qwen with a Qwen2 or Llama LLM (4 blocks), no dropout, the LLM trained or frozen."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    if family == "qwen2":
        text = tiny_qwen2_config(vocab_size=64, num_layers=4)
    else:
        text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    model = MiniGPT4Qwen(minigpt4qwen_config(text, image_token_id=IMAGE_TOKEN_ID, vision_config=tiny_vision_config(),
                                             qformer_config=tiny_qformer_config(), num_query_tokens=NUM_QUERIES))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.set_trainable(TrainableParts(language_projection=True, language_model=llm_trained))
    return model


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory, project) -> tuple[Path, dict]:  # noqa: F811
    out = tmp_path_factory.mktemp("pp")
    (out / "cli_config").write_text(str(project / "train.yaml"))
    launch("tests.test_pipeline", out)
    return out, torch.load(out / "results.pt")


def _grad_norms(output_dir: Path) -> list[float]:
    records = (json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines())
    return [r["grad_norm"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_pipeline_matches_single_process(pp_run, name, tmp_path):
    out, results = pp_run
    family, llm_trained, _, precision = SCENARIOS[name]
    model = tiny_family(family, llm_trained)
    cfg = config(tmp_path / "ref", max_steps=STEPS, precision=precision, **BATCH)
    ref = Trainer(model, cfg, ToyDataset(), collate).fit()
    assert results[name]["losses"] == pytest.approx(ref.losses, rel=1e-4)
    # The norm over both stages, so clipping (active on every step here) scaled the gradients as the trainer did.
    ref_norms = _grad_norms(tmp_path / "ref")
    assert min(ref_norms) > BATCH["grad_clip"]
    assert _grad_norms(out / name) == pytest.approx(ref_norms, rel=1e-4)
    # A frozen LLM leaves the second stage (blocks + head) with nothing to train.
    assert (min(results[name]["trainable_per_stage"]) == 0) == (not llm_trained)
    # Every trained weight, read back through the pipeline checkpoint and its conversion.
    converted = read_native_checkpoint(convert_to_native(out / name, tmp_path / "native"))
    expected = trainable(model)
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(converted[key], value, atol=1e-5, rtol=1e-4), key


def test_packed_rows_through_the_pipeline_equal_one_process(pp_run, tmp_path):
    # Positions travel between the stages, so each block attends within its samples as the trainer's LLM does.
    _, results = pp_run
    model = tiny_family("qwen2", False)
    data = PackToy()
    ref = Trainer(model, config(tmp_path / "ref", max_steps=STEPS, **BATCH), data, PackingCollator(PAD, 64),
                  packed_lengths=data.lengths).fit()
    assert results["packed"]["losses"] == pytest.approx(ref.losses, rel=1e-4)
    padded = Trainer(tiny_family("qwen2", False), config(tmp_path / "padded", max_steps=STEPS, **BATCH), data,
                     DataCollator(PAD)).fit()
    assert results["packed"]["losses"] == pytest.approx(padded.losses, rel=1e-4)  # the same samples, unpacked


def test_pipeline_resume_continues_identically(pp_run):
    _, results = pp_run
    assert results["resumed"]["losses"] == results["qwen2_unfrozen"]["losses"][1:]


def test_cli_pipeline_run_converts_and_loads(pp_run, tmp_path):
    out, _ = pp_run
    config_path = (out / "cli_config").read_text()
    assert (out / "cli" / "latest").read_text() == "checkpoint-00000004"
    native = tmp_path / "native"
    assert cli_main(["convert", str(out / "cli"), str(native), "--parts", "language_projection"]) == 0
    weights = read_native_checkpoint(native)
    assert set(weights) == {"language_projection.weight", "language_projection.bias"}
    model, _ = build_model(load_config(config_path, [f"model.checkpoint={native}"], RunConfig).model)
    assert torch.equal(model.language_projection.weight, weights["language_projection.weight"])


def _worker(out: Path) -> None:
    from minigpt4qwen.model.activation_checkpointing import apply_activation_checkpointing
    from minigpt4qwen.training.distributed import all_gather_objects, init_distributed
    from minigpt4qwen.training.entry import train_main
    from minigpt4qwen.training.parallel_config import ParallelConfig
    from minigpt4qwen.training.pipeline import PipelineTrainer

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    parallel = ParallelConfig(engine="pipeline", num_stages=2)
    results = {}
    runs = [(name, *spec, {"save_every_steps": 1}) for name, spec in SCENARIOS.items()]
    runs.append(("resumed", "qwen2", True, False, "fp32",
                 {"resume": str(out / "qwen2_unfrozen" / "checkpoint-00000001")}))
    for name, family, llm_trained, checkpointing, precision, kw in runs:
        model = tiny_family(family, llm_trained)
        apply_activation_checkpointing(model, vision=False, language_model=checkpointing)
        cfg = config(out / name, max_steps=STEPS, precision=precision, **BATCH, **kw)
        trainer = PipelineTrainer(model, cfg, ToyDataset(), collate, info=info, parallel=parallel)
        trainer.resume()
        results[name] = {"losses": trainer.fit().losses, "trainable_per_stage": all_gather_objects(len(trainer.params))}
    data = PackToy()  # rows of up to 64 tokens: several samples each
    trainer = PipelineTrainer(tiny_family("qwen2", False), config(out / "packed", max_steps=STEPS, **BATCH), data,
                              PackingCollator(PAD, 64), info=info, parallel=parallel, packed_lengths=data.lengths)
    results["packed"] = {"losses": trainer.fit().losses}
    if info.is_main:
        torch.save(results, out / "results.pt")
    # The user's path last: it builds the model on the CPU (DeepSpeed moves each stage) and ends the process group.
    train_main((out / "cli_config").read_text(), ["parallel.engine=pipeline", "parallel.num_stages=2",
                                                   f"train.output_dir={out / 'cli'}"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
