"""DeepSpeed checkpoints that cannot be resumed or converted say which file and why, and the advice works.

One `torchrun --nproc_per_node 2` run on the CPU (the `__main__` block) trains ZeRO-3 for two steps, then tries to
resume it with fewer trainable parts and with another global batch; the tests read the errors it saved.
"""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from minigpt4qwen.checkpoint.deepspeed_convert import MODEL_STATES, _weights_only_loads, convert_to_native  # noqa: E402
from minigpt4qwen.checkpoint.keymap import CheckpointError  # noqa: E402
from minigpt4qwen.checkpoint.sources import read_model_checkpoint  # noqa: E402
from minigpt4qwen.cli.main import main  # noqa: E402
from minigpt4qwen.model.parts import TrainableParts  # noqa: E402
from tests.test_deepspeed import launch  # noqa: E402
from tests.test_trainer import ToyDataset, collate, config, tiny  # noqa: E402

TAG = "checkpoint-00000002"


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero3")
    launch("tests.test_rough_edges_deepspeed", out)
    return out / "run" / TAG, torch.load(out / "errors.pt")


def test_zero3_resume_with_fewer_trainable_parts_names_the_file_and_the_parts(zero3):
    source, errors = zero3
    message = errors["fewer_parts"]
    assert message.startswith(f"CheckpointError: {source / 'zero_pp_rank_0_mp_rank_00_model_states.pt'}: ")
    assert "trained the parts ['vision_model', 'qformer', 'query_tokens', 'language_projection', 'language_model']" \
        in message
    assert "this run trains ['language_projection']" in message and "IndexError" not in message


def test_the_deepspeed_restart_hint_is_a_command_that_works(zero3, capsys):
    source, errors = zero3
    message = errors["other_batch"]
    assert "4 samples per optimizer step, this run has 8" in message
    command = message.split("minigpt4qwen convert ", 1)[1].split(", then", 1)[0]
    assert main(["convert", *shlex.split(command)]) == 0
    native = Path(shlex.split(command)[1])
    assert f"model.checkpoint={native} train.resume=none" in message
    tensors = read_model_checkpoint(native)  # what model.checkpoint= reads
    assert "language_projection.weight" in tensors and any(k.startswith("language_model.") for k in tensors)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_converting_a_torn_zero_checkpoint_names_the_file(zero3, tmp_path, damage):
    source, _ = zero3
    torn = tmp_path / TAG
    shutil.copytree(source, torn)
    shard = torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^{shard}(: truncated| is missing)"):
        convert_to_native(torn, tmp_path / "native")


class RunsCode:
    """Unpickling it runs a shell command (creates `marker`): what a crafted checkpoint file can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_model_states_file_is_refused_without_running_its_code(tmp_path):
    tag = tmp_path / "global_step1"
    tag.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"module": {"language_projection.weight": torch.zeros(2, 2)}, "x": RunsCode(marker)},
               tag / MODEL_STATES)
    with pytest.raises(CheckpointError, match=rf"^{tag / MODEL_STATES}: refused: it holds posix.system"):
        convert_to_native(tag, tmp_path / "native")
    assert not marker.exists() and not (tmp_path / "native").exists()


def test_a_crafted_zero_optimizer_file_is_refused_without_running_its_code(zero3, tmp_path):
    source, _ = zero3
    tampered = tmp_path / TAG
    shutil.copytree(source, tampered)
    shard = tampered / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    states = torch.load(shard, weights_only=False)
    torch.save({**states, "x": RunsCode(marker)}, shard)
    with pytest.raises(CheckpointError, match=rf"^{shard}: refused: it holds posix.system"):
        convert_to_native(tampered, tmp_path / "native")
    assert not marker.exists()


def test_deepspeeds_own_reads_are_weights_only_during_the_conversion(tmp_path):
    # DeepSpeed's ZeRO reader calls torch.load(weights_only=False) itself; the conversion overrides that.
    marker = tmp_path / "code-ran"
    torch.save({"x": RunsCode(marker)}, tmp_path / "crafted.pt")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with _weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert not marker.exists() and os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # restored


def _worker(out: Path) -> None:
    from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer
    from minigpt4qwen.training.distributed import DistInfo, destroy, init_distributed
    from minigpt4qwen.training.parallel_config import ParallelConfig

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)
    parallel = ParallelConfig(engine="deepspeed", zero_stage=3)

    def trainer(parts=None, **kw) -> DeepSpeedTrainer:
        cfg = config(out / "run", **{"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, **kw})
        return DeepSpeedTrainer(tiny(parts), cfg, ToyDataset(), collate, info=info, parallel=parallel)

    trainer().fit()
    errors = {}
    for name, parts, kw in (("fewer_parts", TrainableParts(), {}), ("other_batch", None, {"grad_accum": 2})):
        try:
            trainer(parts, resume=str(out / "run" / TAG), **kw).resume()
            errors[name] = "resumed"
        except Exception as err:  # the tests compare the message, whatever the type
            errors[name] = f"{type(err).__name__}: {err}"
    if info.is_main:
        torch.save(errors, out / "errors.pt")
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
