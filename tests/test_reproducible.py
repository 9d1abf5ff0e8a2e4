"""Same config, same `train.seed`: bitwise the same run (issue 12, item 2). The fresh projection, the LoRA
adapters' init and their dropout all draw from RNGs that `train_main` seeds from `train.seed`."""

import json

import pytest
import torch

from minigpt4qwen.checkpoint.native import read_native_checkpoint
from minigpt4qwen.training import state
from minigpt4qwen.training.entry import train_main
from tests.test_cli_train import project  # noqa: F401 (a fixture)

LORA = ["train.lora.enabled=true", "train.lora.r=2", "train.lora.alpha=4", "train.lora.dropout=0.5"]


def run(project, out, seed: int, extra: list[str]) -> tuple[dict[str, torch.Tensor], list[float]]:  # noqa: F811
    """Two steps of the tiny project from a fresh projection: (saved weights, logged losses)."""
    train_main(str(project / "train.yaml"), [f"train.output_dir={out}", f"train.seed={seed}", "train.max_steps=2",
                                             "train.resume=none", *extra])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return read_native_checkpoint(state.find_latest(out)), [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("extra", [[], LORA], ids=["projection", "lora"])
def test_same_seed_same_weights_other_seed_other_weights(project, tmp_path, extra):  # noqa: F811
    # Other draws in between, as another process's history would make: the run must not depend on them.
    weights_a, losses_a = run(project, tmp_path / "a", 7, extra)
    torch.rand(100)
    weights_b, losses_b = run(project, tmp_path / "b", 7, extra)
    weights_c, losses_c = run(project, tmp_path / "c", 8, extra)
    assert weights_a.keys() == weights_b.keys() == weights_c.keys()
    assert "language_projection.weight" in weights_a and (not extra or any("lora_A" in k for k in weights_a))
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    assert losses_a == losses_b
    assert not torch.equal(weights_a["language_projection.weight"], weights_c["language_projection.weight"])
    assert losses_a[0] != losses_c[0]  # the first step's loss already depends on the seeded projection
