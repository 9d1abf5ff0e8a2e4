"""`parallel.engine: pipeline`: a DeepSpeed `PipelineModule` built from the model's own modules.

Layers: `pipeline_stages.py` (the model's own modules, cut into a sequence of stages). Batches are
padded to a multiple of `parallel.seq_bucket` (see entry.py), so only a few activation shapes occur. ZeRO-0 with
the trainer's own precision (part dtypes + autocast) and its clipping by the norm over all stages; a stage may
have nothing to train (frozen LLM). No validation pass. Checkpoints: DeepSpeed's `layer_XX-model_states.pt`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minigpt4qwen.checkpoint.deepspeed_convert import PIPELINE_KEYS
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.training.config import TrainConfig
from minigpt4qwen.training.deepspeed_engine import DeepSpeedTrainer
from minigpt4qwen.training.distributed import DistInfo, barrier
from minigpt4qwen.training.metrics import MetricsLogger
from minigpt4qwen.training.parallel_config import ParallelConfig
from minigpt4qwen.training.pipeline_stages import BlockLayer, pipeline_layers, stage_inputs
from minigpt4qwen.training.text_only import step_counts
from minigpt4qwen.training.trainer import NonFiniteError


def stage_bounds(layers: Sequence[nn.Module], parallel: ParallelConfig) -> list[int]:
    """Layer index boundaries of the stages ([0, ..., len(layers)]), per `parallel.partition`.

    Raises:
        ValueError: an explicit balance that does not cover the layers.
    """
    from deepspeed.runtime import utils as ds_utils

    if parallel.partition == "balance":
        if sum(parallel.balance) != len(layers) or min(parallel.balance) < 1:
            raise ValueError(f"parallel.balance {parallel.balance} must split all {len(layers)} layers "
                             f"(1 embedding + {len(layers) - 2} blocks + 1 head)")
        return [sum(parallel.balance[:i]) for i in range(parallel.num_stages + 1)]
    if parallel.partition == "uniform":
        return ds_utils.partition_uniform(len(layers), parallel.num_stages)
    # All parameters count, frozen included: the stages' memory is what is balanced.
    return ds_utils.partition_balanced([sum(p.numel() for p in layer.parameters()) for layer in layers],
                                       parallel.num_stages)


def layer_keys(model: nn.Module, layers: Sequence[nn.Module]) -> dict[str, dict[str, str]]:
    """{layer index: {key in that layer's state dict: the model's state-dict key}} (what conversion reads)."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {str(i): {k: names[id(t)] for k, t in layer.state_dict(keep_vars=True).items() if id(t) in names}
            for i, layer in enumerate(layers)}


def build_pipeline_module(model: MiniGPT4Qwen, parallel: ParallelConfig,
                          autocast: Callable[[], AbstractContextManager] = nullcontext,
                          ) -> tuple[nn.Module, list[nn.Module]]:
    """(the `PipelineModule` of this process's stage, all layers); `autocast` wraps every forward and the loss."""
    from deepspeed.pipe import PipelineModule

    layers = pipeline_layers(model)
    bounds = stage_bounds(layers, parallel)

    class StagedPipeline(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:  # our bounds instead of DeepSpeed's methods
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

        def train(self, mode: bool = True) -> StagedPipeline:
            super().train(mode)
            model.train(mode)  # keeps the frozen parts in eval mode, as the model's own train() does
            return self

        def forward(self, forward_input):
            with autocast():
                return super().forward(forward_input)

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast():
            return layers[-1].loss(hidden, labels)

    # dynamic_shape: the sequence length changes between batches (by buckets), so shapes are sent every time.
    module = StagedPipeline(layers=layers, num_stages=parallel.num_stages, loss_fn=loss_fn,
                            partition_method="parameters", dynamic_shape=True)
    return module, layers


class GlobalNormClip:
    """An optimizer step pre-hook: the gradient norm over all stages, and the trainer's clipping with it.

    DeepSpeed's clipping counts only the first stage's parameters (it takes the pipe group for tensor-parallel
    ranks) and fails on a stage without gradients, so it is off and this hook clips: squared norms summed per stage,
    all-reduced, then min(1, max_norm / (norm + 1e-6)) as in `clip_grad_norm_`. A non-finite norm drops the
    gradients (AdamW then leaves weights and state alone), like the trainer's skipped step.

    Args:
        max_norm: `train.grad_clip`; 0 measures the norm without clipping.
        group: the processes whose gradients together make one copy of the model (one pipeline's stages).
        device: where the all-reduced tensor lives (the process's device: NCCL needs CUDA, gloo the CPU).
    """

    def __init__(self, max_norm: float, group, device: torch.device):
        self.max_norm, self.group, self.device = max_norm, group, device
        self.norm = math.nan

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        if params:  # per-parameter fp32 norms, as clip_grad_norm_ takes them; no host sync per parameter
            norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params]
            squares += torch.stack(norms).to(self.device, torch.float64).pow(2).sum()
        # Every stage takes part, trainable parameters or not: the collective needs all of the group.
        dist.all_reduce(squares, group=self.group)
        self.norm = float(squares.sqrt())
        if not math.isfinite(self.norm):
            for p in params:
                p.grad = None
        elif self.max_norm > 0:
            coef = min(1.0, self.max_norm / (self.norm + 1e-6))
            for p in params:
                p.grad.mul_(coef)


@dataclass(frozen=True)
class DataParallelView(DistInfo):
    """The trainer sees the data-parallel replica (rank/world size among replicas); the main process stays global."""

    global_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0


class PipelineTrainer(DeepSpeedTrainer):
    """The trainer's loop with `PipelineEngine.train_batch` as the step (DP = processes / `parallel.num_stages`).

    Args:
        model, cfg, dataset, collate, kwargs: as for `DeepSpeedTrainer`; `model` may live on the CPU, DeepSpeed
            moves each stage's layers to the device. No validation set (the loop's evaluation is not pipelined).
        parallel: stages, partitioning; ZeRO stage 0 (see `GlobalNormClip` for why not 1).
        info: this process's global place.

    Raises:
        ValueError: a validation set, ZeRO-1 or fp16 (unsupported here), or an invalid `parallel`.
    """

    def __init__(self, model: MiniGPT4Qwen, cfg: TrainConfig, dataset, collate, *, parallel: ParallelConfig,
                 info: DistInfo | None = None, **kwargs):
        import deepspeed

        info = info or DistInfo()
        parallel.validate(info.world_size)
        if kwargs.get("val_dataset") is not None:
            raise ValueError("the pipeline engine does not evaluate a validation set; remove data.val_datasets")
        if parallel.zero_stage != 0:
            # ZeRO-1 steps the optimizer once per parameter group, so a step hook cannot see the whole gradient.
            raise ValueError("the pipeline engine runs ZeRO stage 0 (its global gradient clipping needs it)")
        if cfg.precision == "fp16":
            raise ValueError("the pipeline engine trains in bf16 or fp32 (fp16 would need loss scaling); "
                             "set train.precision=bf16")
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        # Mixed precision as in the trainer (part dtypes + autocast): DeepSpeed's bf16 mode would cast every part to
        # bf16, and its optimizer fails on a stage with nothing to train.
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        autocast = (lambda: torch.autocast(info.device.type, dtype=dtype)) if dtype else nullcontext
        module, layers = build_pipeline_module(model, parallel, autocast)
        view = DataParallelView(rank=module._grid.data_parallel_id, world_size=info.world_size // parallel.num_stages,
                                local_rank=info.local_rank, device=info.device, global_rank=info.rank)
        # DeepSpeed neither clips (see GlobalNormClip) nor casts (see above): only its config reads this copy.
        super().__init__(model, replace(cfg, grad_clip=0.0, precision="fp32"), dataset, collate, parallel=parallel,
                         module=module, info=view, **kwargs)
        self.cfg, self.autocast = cfg, autocast
        self.head, self.keys = layers[-1], layer_keys(model, layers)
        self.blocks = [layer for layer in layers if isinstance(layer, BlockLayer)]
        # Every replica holds whole, already averaged gradients: one pipeline's stages make the whole model.
        self.clip = GlobalNormClip(cfg.grad_clip, self.engine.grid.get_pipe_parallel_group(), info.device)
        self.engine.optimizer.register_step_pre_hook(self.clip)  # fp32 ZeRO-0: DeepSpeed steps our AdamW itself

    def _step(self, micro: Sequence[dict]) -> tuple[float, float, int]:
        """One `train_batch` over the micro-batches; returns (global loss, grad norm, global tokens).

        Raises:
            NonFiniteError: a non-finite loss that DeepSpeed applied anyway (finite gradients, no overflow check).
        """
        # Summed over the replicas (not the stages, which all see the replica's micro-batches); each stage's
        # image-free guard needs the step's images, though only the first stage holds the image path.
        total_tokens, self.image_free_guard.images = step_counts(micro, self.info.device,
                                                                 self.engine.grid.get_data_parallel_group())
        # DeepSpeed divides each micro-batch loss by grad_accum and averages over replicas.
        self.head.scale = self.cfg.grad_accum * self.info.world_size / max(total_tokens, 1)
        packed = "position_ids" in micro[0]  # from data/packing.py's collator
        for block in self.blocks:
            block.packed = packed
        batches = [(stage_inputs(b), b["labels"]) for b in micro]
        loss, grad_norm = float(self.engine.train_batch(iter(batches))), self.clip.norm  # the hook ran in the step
        self._applied = math.isfinite(loss) and math.isfinite(grad_norm) and self.engine.was_step_applied()
        if not math.isfinite(loss) and math.isfinite(grad_norm) and self.engine.was_step_applied():
            raise NonFiniteError(f"non-finite loss {loss} was applied by the pipeline engine; resume from the last "
                                 "checkpoint with another lr, or check the data")
        return loss, grad_norm, total_tokens

    def save(self, logger_: MetricsLogger, extra: dict | None = None) -> Path:
        """DeepSpeed's pipeline checkpoint plus `pipeline_keys.json`, the layer-to-model key names (collective)."""
        path = super().save(logger_, extra)
        if self.info.is_main:
            (path / PIPELINE_KEYS).write_text(json.dumps(self.keys, indent=1))
        barrier()  # the key file exists on return, on every rank
        return path

    def _module_load_options(self, source: Path) -> dict:
        # The pipeline engine reads per-layer files and takes no custom load function; frozen layers are absent.
        return {"load_module_strict": False}
