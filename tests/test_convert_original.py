"""The original project's DeepSpeed checkpoint directories convert to native checkpoints that load into our model.

Layouts from tests/data/manifests/minigpt4qwen_checkpoints.json, with tiny shapes: the ZeRO runner's
`deepspeed_ckpt/epoch_N/` (complete module in `mp_rank_00_model_states.pt`, frozen parts included) and the
pipeline's `global_stepN/` (`layer_XX-model_states.pt`, dummy identity layers, frozen-LLM `occupy` layer). Each
converts through `minigpt4qwen convert` and must equal what the original's flat `model.pth` reads as.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from minigpt4qwen.checkpoint.keymap import load_checked
from minigpt4qwen.checkpoint.native import read_native_checkpoint
from minigpt4qwen.checkpoint.original import read_original_checkpoint
from minigpt4qwen.checkpoint.qwen1 import qwen2_config_from_qwen1
from minigpt4qwen.checkpoint.sources import read_model_checkpoint
from minigpt4qwen.cli.main import main as cli_main
from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen, part_of_key
from tests.test_lavis_checkpoints import QUERIES
from tests.test_original_checkpoints import QWEN1_TINY, raw, write_pipeline_dir  # noqa: F401 (raw: a fixture)

PROJECTION = {"language_projection.weight", "language_projection.bias"}


def bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}


def write_zero_dir(state_dict: dict[str, torch.Tensor], run_dir: Path, epoch: int) -> Path:
    """The original's `deepspeed_runner` save: `deepspeed_ckpt/epoch_N/` plus `latest`, bf16 ZeRO optimizer files."""
    ckpt_dir = run_dir / "deepspeed_ckpt"
    tag_dir = ckpt_dir / f"epoch_{epoch}"
    tag_dir.mkdir(parents=True)
    module = bf16(state_dict)  # the original trained in bf16; the engine's module holds that copy
    torch.save({"module": module, "buffer_names": ["Qformer.bert.embeddings.position_ids"], "optimizer": None,
                "lr_scheduler": None, "global_steps": 30, "ds_version": "0.13.5", "epoch": epoch,
                "config": {"run": {"lr": 1e-4}}}, tag_dir / "mp_rank_00_model_states.pt")
    for rank in range(2):  # their content (fp32 partitions) is not what the conversion reads
        torch.save({"optimizer_state_dict": {}}, tag_dir / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (ckpt_dir / "latest").write_text(tag_dir.name)
    return ckpt_dir


def convert(source: Path, out: Path, *parts: str) -> dict[str, torch.Tensor]:
    """`minigpt4qwen convert SOURCE OUT [--parts ...]`, then the written checkpoint read back."""
    assert cli_main(["convert", str(source), str(out), *(["--parts", *parts] if parts else [])]) == 0
    return read_native_checkpoint(out)


def tiny_original_model() -> MiniGPT4Qwen:
    """Our model in the tiny original's shapes (Qwen1 config converted to Qwen2, tiny EVA and Q-Former)."""
    text = qwen2_config_from_qwen1(QWEN1_TINY)
    config = minigpt4qwen_config(text, image_token_id=5, vision_config=tiny_vision_config(),
                                 qformer_config=tiny_qformer_config(), num_query_tokens=QUERIES)
    return MiniGPT4Qwen(config, language_model=Qwen2ForCausalLM(text))


def assert_same(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


@pytest.fixture
def original(raw, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # noqa: F811
    """(the full original state dict in its own names, what its flat `model.pth` reads as: the reference)."""
    torch.save(raw, tmp_path / "model.pth")
    return raw, read_original_checkpoint(tmp_path / "model.pth")


def test_zero_runner_dir_converts_and_loads(original, tmp_path: Path) -> None:
    source, full = original
    ckpt_dir = write_zero_dir(source, tmp_path / "run", epoch=3)
    expected = bf16(full)
    for path in (ckpt_dir, ckpt_dir / "epoch_3"):  # the save_dir follows `latest`
        assert_same(convert(path, tmp_path / f"all_{path.name}"), expected)
    projection = convert(ckpt_dir, tmp_path / "proj", "language_projection")
    assert_same(projection, {k: expected[k] for k in PROJECTION})
    # The complete conversion fills every tensor of our model (nothing left at random init).
    model = tiny_original_model()
    assert load_checked(model, read_model_checkpoint(tmp_path / "all_deepspeed_ckpt"), "converted") == []
    assert torch.equal(model.language_projection.weight, expected["language_projection.weight"].float())


@pytest.mark.parametrize("frozen_llm", [False, True])
def test_pipeline_dir_converts_and_loads(original, tmp_path: Path, frozen_llm: bool) -> None:
    source, full = original
    write_pipeline_dir(source, tmp_path / "run" / "global_step7", frozen_llm)
    (tmp_path / "run" / "latest").write_text("global_step7")
    assert_same(convert(tmp_path / "run", tmp_path / "all"), full)
    # projection + LLM: what the original's (crashing) pipemodel2pth.py meant to write
    trained = convert(tmp_path / "run" / "global_step7", tmp_path / "trained", "language_projection", "language_model")
    assert_same(trained, {k: v for k, v in full.items() if part_of_key(k) in ("language_projection", "language_model")})
    model = tiny_original_model()
    missing = load_checked(model, read_model_checkpoint(tmp_path / "trained"), "converted", allow_missing=True)
    assert missing and all(part_of_key(k) not in ("language_projection", "language_model") for k in missing)
    assert torch.equal(model.language_model.lm_head.weight, full["language_model.lm_head.weight"])


def test_flat_projection_file_converts(original, tmp_path: Path) -> None:
    """pipe_proj2pth.py's `model.pth` (projection only, original names)."""
    source, _ = original
    torch.save({k: v for k, v in source.items() if k.startswith("llm_proj.")}, tmp_path / "model.pth")
    converted = convert(tmp_path / "model.pth", tmp_path / "native")
    assert set(converted) == PROJECTION
    assert torch.equal(converted["language_projection.weight"], source["llm_proj.weight"])
