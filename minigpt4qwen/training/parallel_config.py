"""`parallel:` section of a run config: which engine trains (DDP, DeepSpeed ZeRO, DeepSpeed pipeline) and how.

Kept apart from `deepspeed_engine.py` so that reading a config never imports DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

ENGINES = ("ddp", "deepspeed", "pipeline")
PARTITIONS = ("parameters", "uniform", "balance")


@dataclass
class ParallelConfig:
    """Engine settings; the optimiser, schedule, precision, clipping and batch sizes stay in `train:`.

    engine: ddp (the plain trainer) | deepspeed (ZeRO, `zero_stage`) | pipeline (DeepSpeed pipeline parallelism,
        `num_stages` stages; data parallelism = processes / num_stages).
    zero_stage: 0-3 for engine=deepspeed; 0 for engine=pipeline (global-norm clipping across stages needs it).
    offload_optimizer / offload_param: ZeRO-Offload of the optimizer states (stage >= 1) / parameters (stage 3)
        to CPU memory.
    partition: how the pipeline's layers are split: by parameter count (all parameters, frozen ones included,
        since memory is what is balanced), uniform layer count, or `balance` (layers per stage, explicit).
    seq_bucket: the pipeline pads every batch's length up to a multiple of this, so only a few activation
        shapes travel between stages.
    """

    engine: str = "ddp"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    num_stages: int = 1
    partition: str = "parameters"
    balance: List[int] = field(default_factory=list)
    seq_bucket: int = 64

    def validate(self, world_size: int | None = None) -> None:
        """Raises ValueError for inconsistent settings (`world_size` checks the stage count when given)."""
        if self.engine not in ENGINES:
            raise ValueError(f"parallel.engine must be one of {ENGINES}, not {self.engine!r}")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"parallel.zero_stage must be 0-3, not {self.zero_stage}")
        if self.engine == "pipeline" and self.zero_stage != 0:
            # ZeRO-1 steps the optimizer per parameter group, which defeats the pipeline's global-norm clipping.
            raise ValueError("the pipeline engine runs with parallel.zero_stage 0 (DP x PP without ZeRO sharding)")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("parallel.offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs zero_stage >= 1")
        if self.engine == "ddp" and (self.zero_stage or self.offload_optimizer):
            raise ValueError("parallel.zero_stage / offload_optimizer act only with parallel.engine=deepspeed")
        if self.engine != "pipeline" and (self.num_stages != 1 or self.balance):
            raise ValueError("parallel.num_stages / balance act only with parallel.engine=pipeline")
        if self.partition not in PARTITIONS:
            raise ValueError(f"parallel.partition must be one of {PARTITIONS}, not {self.partition!r}")
        if self.partition == "balance" and len(self.balance) != self.num_stages:
            raise ValueError(f"parallel.balance needs one layer count per stage ({self.num_stages}), "
                             f"got {self.balance}")
        if self.num_stages < 1 or self.seq_bucket < 1:
            raise ValueError("parallel.num_stages and parallel.seq_bucket must be >= 1")
        if world_size is not None and self.engine == "pipeline" and world_size % self.num_stages:
            raise ValueError(f"{world_size} processes are not a multiple of parallel.num_stages={self.num_stages}")
