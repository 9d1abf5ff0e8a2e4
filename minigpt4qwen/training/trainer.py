"""The training loop: exact token-weighted loss over accumulation and processes, AMP, clipping, guards, resume.

Each optimizer step takes a global batch of micro_batch_size x grad_accum x world_size samples. The supervised
tokens of all its micro-batches are counted (and summed over ranks) before the first forward, and each
micro-batch's summed loss is divided by that total, so the gradient is that of the mean loss per supervised token
of the whole global batch, however it is split: 4 x 2 equals 1 x 8, and 2 processes equal 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from minigpt4qwen.training import state as ckpt
from minigpt4qwen.training.batches import rank_micro_batches
from minigpt4qwen.training.config import TrainConfig
from minigpt4qwen.training.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, unwrap
from minigpt4qwen.training.metrics import DataReport, MetricsLogger, write_run_files
from minigpt4qwen.training.optim import build_optimizer, build_scheduler
from minigpt4qwen.training.resume_checks import continue_position
from minigpt4qwen.training.text_only import ImageFreeStepGuard, step_counts

logger = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


MAX_OVERFLOW_RUN = 20  # fp16 overflow skips in a row before giving up: the loss scale fell by 2**20 in vain


class NonFiniteError(RuntimeError):
    """Too many optimizer steps had a non-finite loss or gradient norm (train.max_nonfinite_steps)."""


@dataclass
class TrainResult:
    """What a `fit` did: the loss of every optimizer step (NaN for skipped ones), skipped steps, the last save."""

    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None


class Trainer:
    """Trains `model` on `dataset` with the settings of `cfg`.

    Args:
        model: the model, trainable flags and dtypes set, already on `info.device`; DDP-wrapped when
            `info.world_size > 1` (see `distributed.wrap_ddp`).
        cfg: the training settings.
        dataset: a map-style dataset of samples; `collate` turns a list of them into a batch dict with
            input_ids, attention_mask, labels and (optionally) pixel_values.
        collate: the batch builder.
        val_dataset: optional validation set (its loss is logged every `eval_every` steps and at epoch ends).
        info: this process's rank and device.
        num_workers: DataLoader workers.
        config_yaml: the whole run's config, saved as output_dir/config.yaml.
        lengths: per-sample token lengths; given, batches group samples of similar length.
        packed_lengths: per-sample token lengths when `collate` packs rows (data.packing): each global batch's
            micro-batches then get similar numbers of tokens (`balance_micro_batches`), the same samples per step.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, dataset: Dataset, collate: Callable[[list], dict], *,
                 val_dataset: Dataset | None = None, info: DistInfo | None = None, num_workers: int = 0,
                 config_yaml: str | None = None, lengths: Sequence[int] | None = None,
                 packed_lengths: Sequence[int] | None = None):
        cfg.validate()
        info = info or DistInfo()
        self.lengths, self.packed_lengths = lengths, packed_lengths
        self.model, self.cfg, self.info = model, cfg, info
        self.dataset, self.val_dataset, self.collate = dataset, val_dataset, collate
        self.num_workers = num_workers
        self.config_yaml = config_yaml
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * info.world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples do not fill one global batch of {self.global_batch} "
                             "(micro_batch_size x grad_accum x processes)")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(unwrap(model), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # A step without images leaves the image path alone (text_only.py); on our AdamW, so under every engine.
        self.image_free_guard = ImageFreeStepGuard()
        self.optimizer.register_step_pre_hook(self.image_free_guard)
        device_type = info.device.type
        self.scaler = torch.amp.GradScaler(device_type) if cfg.precision == "fp16" else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else nullcontext
        self.position = ckpt.Position(global_batch=self.global_batch, samples=len(dataset))

    # ------------------------------------------------------------------------------------------ data
    def _micro_batches(self, epoch: int, first_step: int) -> Iterator[dict]:
        """This rank's micro-batches of `epoch` from optimizer step `first_step` on, in order."""
        return rank_micro_batches(self.dataset, self.collate, self.cfg, self.info, epoch, first_step,
                                  lengths=self.lengths, packed_lengths=self.packed_lengths,
                                  num_workers=self.num_workers)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()
                if k in MODEL_INPUTS and isinstance(v, torch.Tensor)}

    # ------------------------------------------------------------------------------------------ steps
    def _loss_scale(self, micro: Sequence[dict]) -> tuple[int, float]:
        """The step's supervised tokens (all micro-batches, all ranks) and the factor that makes each
        micro-batch's summed loss its share of the step's mean; the engines average gradients over ranks, so the
        world size turns that average back into the sum. Also tells the image-free guard the step's images."""
        total_tokens, self.image_free_guard.images = step_counts(micro, self.info.device)
        return total_tokens, self.info.world_size / max(total_tokens, 1)

    def _mean_loss(self, loss_sum: torch.Tensor, total_tokens: int) -> float:
        """The step's mean loss per supervised token over all ranks (`loss_sum` is this rank's sum)."""
        return (all_reduce_sum(loss_sum).item() / total_tokens) if total_tokens else 0.0

    def _step(self, micro: Sequence[dict]) -> tuple[float, float, int]:
        """One optimizer step over this rank's micro-batches; returns (global loss, grad norm, global tokens)."""
        total_tokens, scale = self._loss_scale(micro)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(self.model, "no_sync")
            with nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    out = self.model(**self._to_device(batch))
                loss = out.loss_sum.float() * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += out.loss_sum.detach().double()
        loss = self._mean_loss(loss_sum, total_tokens)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)) if self.params else 0.0
        return loss, grad_norm, total_tokens

    def _apply(self, loss: float, grad_norm: float) -> bool:
        """Updates the weights unless the step is non-finite; returns whether it was applied."""
        finite_loss = math.isfinite(loss)
        if self.scaler:
            # A finite loss with an infinite gradient is fp16 overflow: the scaler skips it and lowers its scale.
            if finite_loss:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = finite_loss and math.isfinite(grad_norm)
        else:
            applied = finite_loss and math.isfinite(grad_norm)
            if applied:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule follows the data: a skipped step still consumed its batch.
        self.scheduler.step()
        return applied

    def _is_overflow(self, loss: float) -> bool:
        """A skipped step with a finite loss under fp16 is dynamic loss scaling at work (the scale goes down)."""
        return self.cfg.precision == "fp16" and math.isfinite(loss)

    def _report_skip(self, metrics: MetricsLogger, record: dict, overflows: int) -> None:
        """Logs a skipped step; raises `NonFiniteError` past `max_nonfinite_steps` non-finite losses or
        `MAX_OVERFLOW_RUN` overflows in a row (then the gradients are infinite at any loss scale)."""
        pos, step = self.position, self.position.global_step
        if overflows:
            metrics.log({**record, "kind": "overflow", "skipped": True}, step)
            logger.info("step %d skipped: fp16 overflow, the loss scale goes down (%d in a row)", step, overflows)
            if overflows > MAX_OVERFLOW_RUN:
                raise NonFiniteError(f"{overflows} fp16 overflows in a row: the gradients are infinite at any loss "
                                     "scale; lower train.lr, check the data, or use bf16")
            return
        pos.nonfinite_steps += 1
        metrics.log({**record, "kind": "nonfinite", "skipped": True}, step)
        logger.warning("step %d skipped: loss %s, grad norm %s (%d/%d non-finite steps)", step, record["loss"],
                       record["grad_norm"], pos.nonfinite_steps, self.cfg.max_nonfinite_steps)
        if pos.nonfinite_steps >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(f"{pos.nonfinite_steps} non-finite steps (train.max_nonfinite_steps); lower "
                                 "train.lr, check the data, or use bf16 instead of fp16")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per supervised token over the validation set (all ranks), in eval mode."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        indices = list(range(self.info.rank, len(self.val_dataset), self.info.world_size))
        mb = self.cfg.micro_batch_size
        loader = DataLoader(self.val_dataset, batch_sampler=[indices[i : i + mb] for i in range(0, len(indices), mb)],
                            collate_fn=self.collate, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        for batch in loader:
            with self.autocast():
                out = unwrap(self.model)(**self._to_device(batch))
            totals += torch.tensor([float(out.loss_sum), out.num_tokens], dtype=torch.float64, device=totals.device)
        self.model.train()
        all_reduce_sum(totals)
        return float(totals[0] / totals[1]) if totals[1] else math.nan

    # ------------------------------------------------------------------------------------------ saving
    def save(self, logger_: MetricsLogger, extra: dict | None = None) -> Path:
        """Writes a resumable checkpoint of the current position (collective: call on every rank)."""
        rngs = all_gather_objects(ckpt.rng_state())
        path = Path(self.cfg.output_dir) / ckpt.checkpoint_name(self.position.global_step)
        if self.info.is_main:
            ckpt.save_training_checkpoint(path, unwrap(self.model), self.optimizer, self.scheduler, self.scaler,
                                          self.position, rngs, contents=self.cfg.save_contents, extra=extra)
            ckpt.prune_checkpoints(self.cfg.output_dir, self.cfg.keep_last)
            logger_.log({"kind": "checkpoint", "path": str(path)}, self.position.global_step)
        barrier()
        return path

    def resume(self) -> Path | None:
        """Loads the checkpoint named by `cfg.resume` (newest in output_dir for "auto"), if any."""
        path = ckpt.resolve_resume(self.cfg.resume, self.cfg.output_dir)
        if path is not None:
            saved = ckpt.load_training_checkpoint(path, unwrap(self.model), self.optimizer, self.scheduler,
                                                  self.scaler, rank=self.info.rank, global_batch=self.global_batch,
                                                  samples=len(self.dataset))
            self._continue_from(path, saved)
        return path

    def _continue_from(self, path: Path, saved: ckpt.Position) -> None:
        """Takes a loaded (and checked) checkpoint's position; on a roll-back to an older checkpoint, the newer
        ones of the abandoned history are set aside (collective: call on every rank)."""
        self.position = continue_position(path, saved, self.global_batch, len(self.dataset), self.steps_per_epoch)
        if self.info.is_main:
            ckpt.set_aside_newer(self.cfg.output_dir, self.position.global_step)
        barrier()
        logger.info("resumed from %s at step %d", path, self.position.global_step)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Runs (or continues) training to `total_steps`; saves per `save_every_steps`, at epoch ends and at the end.

        Returns:
            A `TrainResult` for the steps run by this call.

        Raises:
            NonFiniteError: more than `max_nonfinite_steps` steps were skipped.
            ValueError: fp16 trainable parameters under train.precision=fp16.
        """
        cfg, pos = self.cfg, self.position
        if self.scaler and any(p.dtype == torch.float16 for p in self.params):  # GradScaler cannot unscale them
            raise ValueError("train.precision=fp16 needs fp32 trainable parameters: keep the trained parts in fp32 "
                             "(model.dtypes.<part>=fp32), or use train.precision=bf16")
        if self.info.is_main:
            ckpt.remove_interrupted_saves(cfg.output_dir)
            write_run_files(cfg.output_dir, self.config_yaml, {"world_size": self.info.world_size})
        metrics = MetricsLogger(cfg.output_dir, enabled=self.info.is_main, tensorboard=cfg.tensorboard,
                                wandb=cfg.wandb, run_name=Path(cfg.output_dir).name)
        if pos.global_step:  # resumed: the steps after the checkpoint run (and are logged) again
            metrics.mark_resume(pos.global_step, epoch=pos.epoch, step_in_epoch=pos.step_in_epoch)
        data = DataReport(metrics, getattr(self.dataset, "load_problems", ()), rank=self.info.rank)
        result = TrainResult(global_step=pos.global_step)
        bar = tqdm(total=self.total_steps, initial=pos.global_step, dynamic_ncols=True, desc="train",
                   disable=not (self.info.is_main and cfg.progress_bar))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        overflows = 0  # fp16 overflow skips in a row
        try:
            while pos.global_step < self.total_steps:
                micro_iter = self._micro_batches(pos.epoch, pos.step_in_epoch)
                while pos.step_in_epoch < self.steps_per_epoch and pos.global_step < self.total_steps:
                    started = time.perf_counter()
                    micro = [next(micro_iter) for _ in range(cfg.grad_accum)]
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, grad_norm, tokens = self._step(micro)
                    applied = self._apply(loss, grad_norm)
                    pos.global_step += 1
                    pos.step_in_epoch += 1
                    data.observe(micro, pos.global_step)
                    elapsed = time.perf_counter() - started
                    result.losses.append(loss if applied else math.nan)
                    record = {"kind": "train", "epoch": pos.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens": tokens, "samples_per_s": self.global_batch / elapsed,
                              "tokens_per_s": tokens / elapsed}
                    overflows = overflows + 1 if not applied and self._is_overflow(loss) else 0
                    if not applied:
                        result.skipped_steps.append(pos.global_step)
                        self._report_skip(metrics, record, overflows)
                    elif pos.global_step % cfg.log_every == 0 or pos.global_step == 1:
                        metrics.log(record, pos.global_step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}",
                                    tps=f"{record['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                    epoch_end = pos.step_in_epoch == self.steps_per_epoch
                    if self.val_dataset is not None and (
                        epoch_end or (cfg.eval_every and pos.global_step % cfg.eval_every == 0)
                    ):
                        val = self.evaluate()
                        result.val_losses.append((pos.global_step, val))
                        metrics.log({"kind": "val", "loss": val}, pos.global_step)
                    if epoch_end:
                        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                    done = pos.global_step == self.total_steps
                    if epoch_end or done or (cfg.save_every_steps and pos.global_step % cfg.save_every_steps == 0):
                        result.checkpoint = self.save(metrics, {"loss": loss})
                    if epoch_end:
                        break  # the next epoch needs its own plan and loader
            data.finish(pos.global_step)
        finally:
            bar.close()
            metrics.close()
        result.global_step = pos.global_step
        return result
