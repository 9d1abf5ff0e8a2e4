"""What DeepSpeed cannot keep in step or guard by itself: ZeRO-3's per-call collectives, fp32 ZeRO-0's bad steps.

ZeRO-3 gathers a module's weight on every call, so every rank must call the LM head as often as the others
(one call per forward, whatever its supervised token count), and validation (uneven batches per rank) is refused.
fp32 ZeRO-0 has no overflow check: the trainer skips a step whose averaged gradient is not finite.
The DeepSpeed part runs in one `torchrun --nproc_per_node 1` process (the `__main__` block).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt4qwen.data.config import DatasetSpec
from minigpt4qwen.model.loss import IGNORE_INDEX, masked_lm_loss_sum
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.training.config import RunConfig, TrainConfig
from minigpt4qwen.training.parallel_config import ParallelConfig
from tests.test_trainer import ToyDataset, collate, config, tiny

ROOT = Path(__file__).resolve().parents[1]


class CountingHead(nn.Linear):
    """An LM head that counts its calls (each one a parameter gather under ZeRO-3)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def loss_inputs(supervised: int, length: int = 20001) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, length, 4] hidden states and labels with `supervised` next-token targets."""
    torch.manual_seed(0)
    hidden = torch.randn(1, length, 4, requires_grad=True)
    labels = torch.full((1, length), IGNORE_INDEX)
    labels[0, 1 : supervised + 1] = torch.randint(0, 7, (supervised,))
    return hidden, labels


@pytest.mark.parametrize("supervised, default_calls", [(0, 0), (5, 1), (20000, 3)])
def test_one_call_mode_calls_the_head_once_whatever_the_token_count(supervised, default_calls):
    hidden, labels = loss_inputs(supervised)
    head = CountingHead(4, 7)
    default, n = masked_lm_loss_sum(hidden, labels, head)  # 8192 rows per call
    assert (head.calls, n) == (default_calls, supervised)
    head.calls = 0
    one, n = masked_lm_loss_sum(hidden, labels, head, chunk_rows=None)
    assert (head.calls, n) == (1, supervised)
    assert torch.allclose(one, default, rtol=1e-5)
    one.backward()
    assert head.weight.grad is not None  # the head is reached (zero gradient when nothing is supervised)
    if supervised == 0:
        assert one.item() == 0.0 and not head.weight.grad.any()


def test_the_model_passes_its_loss_chunking_to_the_loss():
    model = tiny(TrainableParts())
    head = model.language_model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    batch = collate([ToyDataset(2)[i] for i in range(2)])
    default = model(**batch)
    model.loss_chunk_rows = 1  # one call per supervised row
    assert model(**batch).loss_sum.item() == pytest.approx(default.loss_sum.item(), rel=1e-5)
    assert len(calls) == 1 + default.num_tokens


def test_zero3_with_a_validation_set_is_refused():
    cfg = RunConfig(train=TrainConfig(precision="fp32"), parallel=ParallelConfig(engine="deepspeed", zero_stage=3))
    cfg.data.datasets = [DatasetSpec(annotation="train.json")]
    cfg.data.val_datasets = [DatasetSpec(annotation="val.json")]
    with pytest.raises(ValueError, match="remove data.val_datasets, or use parallel.zero_stage 0, 1 or 2"):
        cfg.validate()
    cfg.parallel.zero_stage = 2
    cfg.validate()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("ds1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "tests.test_zero3_collectives", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return torch.load(out / "results.pt")


def test_fp32_zero0_skips_a_step_with_an_infinite_gradient(one_process):
    losses, skipped, finite = one_process["inf_grad"]
    assert skipped == [1] and math.isnan(losses[0])  # counted as skipped, like the plain trainer
    assert finite  # the weights kept, not NaN


def test_the_deepspeed_trainer_makes_the_loss_one_head_call_under_zero3_only(one_process):
    assert one_process["chunk_rows"] == {0: 8192, 3: None}


def _worker(out: Path) -> None:
    from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer
    from minigpt4qwen.training.distributed import DistInfo, destroy, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)

    def trainer(name: str, stage: int, model: nn.Module) -> DeepSpeedTrainer:
        cfg = config(out / name, max_steps=1, micro_batch_size=2, grad_accum=1, max_nonfinite_steps=5)
        return DeepSpeedTrainer(model, cfg, ToyDataset(8), collate, info=info,
                                parallel=ParallelConfig(engine="deepspeed", zero_stage=stage))

    model = tiny(TrainableParts())
    model.language_projection.bias.register_hook(lambda g: g + math.inf)  # finite loss, infinite gradient
    result = trainer("inf", 0, model).fit()
    finite = all(bool(torch.isfinite(p).all()) for p in model.language_projection.parameters())
    results = {"inf_grad": (result.losses, result.skipped_steps, finite), "chunk_rows": {}}
    for stage in (0, 3):
        model = tiny(TrainableParts())
        trainer(f"chunk{stage}", stage, model)
        results["chunk_rows"][stage] = getattr(model, "loss_chunk_rows", "absent")
    torch.save(results, out / "results.pt")
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
