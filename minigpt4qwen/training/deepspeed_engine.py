"""`parallel.engine: deepspeed`: the trainer's loop with a DeepSpeed ZeRO-0/1/2/3 engine doing backward and step.

Data order, token-weighted loss, logging, evaluation and the loop itself are the `Trainer`'s; only the step,
the non-finite guard and checkpointing change. Checkpoints are DeepSpeed's own (`output_dir/checkpoint-N/`,
frozen parameters excluded, `output_dir/latest` names the newest); `minigpt4qwen convert` makes native ones.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from minigpt4qwen.training import state as ckpt
from minigpt4qwen.training.config import TrainConfig
from minigpt4qwen.training.distributed import all_gather_objects, barrier
from minigpt4qwen.training.metrics import MetricsLogger
from minigpt4qwen.training.optim import build_scheduler, configured_settings, restore_configured_settings
from minigpt4qwen.training.parallel_config import ParallelConfig
from minigpt4qwen.training.trainer import NonFiniteError, Trainer

logger = logging.getLogger(__name__)
_TAG_RE = re.compile(r"^checkpoint-(\d+)$")


def deepspeed_config(cfg: TrainConfig, parallel: ParallelConfig, data_parallel: int) -> dict:
    """The DeepSpeed config equivalent to `cfg` (the optimizer and schedule are passed as objects, not here).

    Args:
        cfg: batch sizes, precision and gradient clipping.
        parallel: ZeRO stage and offload.
        data_parallel: data-parallel processes (world size, divided by the pipeline stages if any).

    Returns:
        A dict for `deepspeed.initialize(config=...)`.
    """
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parallel.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * data_parallel,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        "zero_optimization": zero,
        # Our AdamW carries the per-part groups of optim.py; DeepSpeed's own optimizers would lose them.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }


def checkpoint_location(resume: str, output_dir: str | Path) -> tuple[Path, str | None] | None:
    """`train.resume` -> (DeepSpeed save_dir, tag) for `load_checkpoint`, or None to start fresh.

    Raises:
        FileNotFoundError: an explicit path that is not a DeepSpeed checkpoint directory.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return (Path(output_dir), None) if (Path(output_dir) / "latest").is_file() else None
    path = Path(resume)
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise FileNotFoundError(f"train.resume={resume!r}: not a DeepSpeed checkpoint directory")
    return path.parent, path.name


def prune_tags(output_dir: str | Path, keep_last: int) -> None:
    """Deletes all but the newest `keep_last` `checkpoint-N` directories (0 keeps everything)."""
    if keep_last <= 0:
        return
    tags = sorted((int(m[1]), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := _TAG_RE.match(p.name)))
    for _, path in tags[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


class StepOutput(NamedTuple):
    """`MiniGPT4QwenOutput` as a named tuple: ZeRO-3 finds the tensors of tuples (not of dataclasses) in a module's
    output to re-gather that module's parameters for the backward pass (the learned queries are direct parameters
    of the root module)."""

    loss: torch.Tensor | None
    loss_sum: torch.Tensor | None
    num_tokens: int
    logits: torch.Tensor | None


def _as_tuple_output(module: nn.Module, args: tuple, output: object) -> StepOutput:
    return StepOutput(output.loss, output.loss_sum, output.num_tokens, output.logits)


class DeepSpeedTrainer(Trainer):
    """A `Trainer` whose model is a DeepSpeed engine (ZeRO stage from `parallel`).

    Args:
        model: the bare model (no DDP wrapper), trainable flags and dtypes set.
        cfg, dataset, collate, kwargs: as for `Trainer` (`info.world_size` is the data-parallel size).
        parallel: the engine settings.
        module: what DeepSpeed wraps when it is not `model` itself (the pipeline's stage); the optimizer then
            holds only its parameters, still grouped by part as in `optim.param_groups(model)`.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, dataset, collate, *, parallel: ParallelConfig,
                 module: nn.Module | None = None, **kwargs):
        import deepspeed

        super().__init__(model, cfg, dataset, collate, **kwargs)
        module = model if module is None else module
        if module is not model:
            mine = {id(p) for p in module.parameters()}
            for group in self.optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in mine]
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g["params"]]
            self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)  # one lr per remaining group
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        if parallel.zero_stage == 3:
            module.register_forward_hook(_as_tuple_output)  # registered first, so it runs before DeepSpeed's hooks
            # Each LM-head call gathers its weight (a collective): the call count must not follow each rank's
            # supervised token count, as the loss's default chunking makes it.
            model.loss_chunk_rows = None
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, parallel, self.info.world_size),
        )
        self.model = self.engine
        if not self.optimizer.param_groups:
            # A stage with nothing to train (frozen LLM blocks): the loop reads an lr (logged by rank 0 only).
            self.optimizer = torch.optim.AdamW([{"params": [], "lr": 0.0}])
        # ZeRO-1/2 check for inf/NaN gradients (and skip the step) only in half precision unless told to.
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            self.engine.optimizer.check_grad_overflow = True
        self._applied = True
        self._skipping = False
        if self._plain_grads() and isinstance(self.engine.optimizer, torch.optim.Optimizer):
            # DeepSpeed steps our AdamW itself: see _boundary_step
            self.engine.optimizer.register_step_pre_hook(self._drop_skipped_grads)

    def _skips_nonfinite(self) -> bool:
        """Whether DeepSpeed itself discards a step with non-finite gradients (else `_boundary_step` must)."""
        return self.engine.fp16_enabled() or getattr(self.engine.optimizer, "check_grad_overflow", False)

    def _step(self, micro: Sequence[dict]) -> tuple[float, float, int]:
        """One optimizer step through the engine; returns (global loss, grad norm, global tokens)."""
        total_tokens, scale = self._loss_scale(micro)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        for i, batch in enumerate(micro):
            with self.autocast():
                out = self.engine(**self._to_device(batch))
            self.engine.backward(out.loss_sum.float() * scale, scale_wrt_gas=False)
            loss_sum += out.loss_sum.detach().double()
            if i < len(micro) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        loss = self._mean_loss(loss_sum, total_tokens)
        self._applied = self._boundary_step(loss)
        return loss, self._grad_norm(), total_tokens

    def _grad_norm(self) -> float:
        """The last step's global gradient norm (NaN where DeepSpeed does not record it: fp32 ZeRO-0)."""
        grad_norm = self.engine.get_global_grad_norm()
        return math.nan if grad_norm is None else float(grad_norm)

    def _plain_grads(self) -> bool:
        """fp32 ZeRO-0: DeepSpeed steps our AdamW on the parameters' own, already rank-averaged `.grad`."""
        return self.engine.zero_optimization_stage() == 0 and not (
            self.engine.bfloat16_enabled() or self.engine.fp16_enabled())

    def _grads_finite(self) -> bool:
        """Whether every trainable parameter's gradient is finite (the same answer on every rank: averaged)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _boundary_step(self, loss: float) -> bool:
        """The optimizer step, skipped for a non-finite loss or gradient like the trainer's; returns whether it
        applied.

        Raises:
            NonFiniteError: a non-finite loss where DeepSpeed cannot skip the step (ZeRO-3 or bf16 ZeRO-0 without
                half-precision overflow checks): stopping keeps the weights and the last checkpoint finite.
        """
        finite = math.isfinite(loss)
        if not self._skips_nonfinite():
            plain = self._plain_grads()
            # A finite loss can still have an inf/NaN gradient (e.g. an overflowing backward); fp32 ZeRO-0 has no
            # overflow check of its own, so AdamW would write NaN into the weights.
            finite = finite and (not plain or self._grads_finite())
            if not finite and not plain:
                raise NonFiniteError(f"non-finite loss {loss} under ZeRO-{self.engine.zero_optimization_stage()}, "
                                     "which cannot skip the step; resume from the last checkpoint with another lr")
            if not finite:
                # Zeros for DeepSpeed's clipping (it fails on no gradients at all), then none for AdamW, which skips
                # parameters without one: the step changes nothing (`_drop_skipped_grads`).
                for p in self.params:
                    if p.grad is not None:
                        p.grad.zero_()
                self._skipping = True
        self.engine.step()
        self._skipping = False
        return finite and self.engine.was_step_applied()

    def _drop_skipped_grads(self, optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook (fp32 ZeRO-0): removes the gradients of a step `_boundary_step` skips."""
        if self._skipping:
            for p in self.params:
                p.grad = None

    def _apply(self, loss: float, grad_norm: float) -> bool:
        """The step already ran in `_step`; keeps the schedule on the data when DeepSpeed skipped one."""
        if not self.engine.was_step_applied():
            self.scheduler.step()  # DeepSpeed leaves the lr schedule alone on overflow; ours follows the data
        return self._applied

    def save(self, logger_: MetricsLogger, extra: dict | None = None) -> Path:
        """DeepSpeed checkpoint `output_dir/checkpoint-N` with the position and all ranks' RNG states (collective)."""
        tag = ckpt.checkpoint_name(self.position.global_step)
        client = {"position": asdict(self.position), "rng": all_gather_objects(ckpt.rng_state()), **(extra or {})}
        self.engine.save_checkpoint(self.cfg.output_dir, tag=tag, client_state=client, exclude_frozen_parameters=True)
        if self.info.is_main:
            prune_tags(self.cfg.output_dir, self.cfg.keep_last)
            logger_.log({"kind": "checkpoint", "path": str(Path(self.cfg.output_dir) / tag)}, self.position.global_step)
        barrier()
        return Path(self.cfg.output_dir) / tag

    def _module_load_options(self, source: Path) -> dict:
        """`load_checkpoint` options for the module weights: checked against what this run trains."""

        def load_trained(src: dict, dst: torch.nn.Module) -> None:
            # Checkpoints written with exclude_frozen_parameters hold the trained weights only; the frozen ones
            # stay as the model build loaded them. DeepSpeed's own non-strict load would not say what is missing.
            ckpt.check_trained_keys(source, src, dst)
            dst.load_state_dict(src, strict=False)

        return {"custom_load_fn": load_trained}

    def resume(self) -> Path | None:
        """Loads the DeepSpeed checkpoint named by `cfg.resume` (`latest` in output_dir for "auto"), if any."""
        location = checkpoint_location(self.cfg.resume, self.cfg.output_dir)
        if location is None:
            return None
        save_dir, tag = location
        if tag is None:  # "auto": the tag DeepSpeed's `latest` file names
            tag = (save_dir / "latest").read_text().strip()
        source = save_dir / tag
        # DeepSpeed restores the saved run's lr, weight decay and schedule with the states: this run's settings win.
        configured = configured_settings(self.optimizer, self.scheduler)
        path, client = self.engine.load_checkpoint(str(save_dir), tag=tag, **self._module_load_options(source))
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {save_dir} (tag {tag})")
        restore_configured_settings(self.optimizer, self.scheduler, configured, source=source)
        saved = ckpt.Position(**client["position"])
        ckpt.check_resumable(source, saved, self.global_batch, len(self.dataset))
        rngs, rank = client["rng"], dist.get_rank() if dist.is_initialized() else 0  # saved by global rank
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        latest = save_dir / "latest"
        if self.info.is_main and save_dir.resolve() == Path(self.cfg.output_dir).resolve() and latest.is_file():
            # After a roll-back `latest` would name a checkpoint that is set aside next: auto-resume continues here.
            latest.write_text(tag)
        self._continue_from(source, saved)  # collective
        return Path(path)
