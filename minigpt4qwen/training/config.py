"""Typed run configuration: `TrainConfig` (optimisation, checkpoints, logging) and `RunConfig`, the whole YAML file.

    cfg = load_config("configs/train_qwen7b.yaml", ["train.max_steps=100"], RunConfig)

Defaults reproduce the original's `instruction_tuning/train.yaml` run section. Only omegaconf-structured types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from minigpt4qwen.config import ModelConfig
from minigpt4qwen.data.config import DataConfig
from minigpt4qwen.model.parts import parse_dtype
from minigpt4qwen.model.quantization import check_mode
from minigpt4qwen.training.parallel_config import ParallelConfig

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM (via peft); the base LLM weights stay frozen. The original's values."""

    enabled: bool = False
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    # Qwen2-architecture names (Qwen-7B-Chat's c_attn/c_proj become these after conversion).
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LrMultipliers:
    """Per-part learning-rate factors (lr of a part = train.lr x its factor)."""

    vision_model: float = 1.0
    qformer: float = 1.0
    query_tokens: float = 1.0
    language_projection: float = 1.0
    language_model: float = 1.0


@dataclass
class TrainConfig:
    """The optimisation and bookkeeping of a run.

    The global batch of one optimizer step is micro_batch_size x grad_accum x world size samples; the loss is the
    mean over all supervised tokens of that batch (exact, whatever the split into micro-batches and processes).
    """

    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 500  # linear from 0, then cosine to min_lr over the remaining steps
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 10
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 1
    grad_accum: int = 16
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "bf16"  # autocast dtype: bf16 | fp16 (with a gradient scaler) | fp32 (no autocast)
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)
    seed: int = 42
    output_dir: str = "output/run"
    save_every_steps: int = 0  # 0: only at the end of each epoch (and of the run)
    keep_last: int = 2  # checkpoints kept in output_dir (older ones deleted); 0 keeps all
    save_contents: str = "trainable"  # trainable | all
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | none | a checkpoint path
    log_every: int = 10  # optimizer steps between JSONL/TensorBoard records
    eval_every: int = 0  # optimizer steps between validation-loss passes; 0: at epoch ends only (if a val set)
    max_nonfinite_steps: int = 10  # stop the run after this many skipped (non-finite) steps
    lora: LoraConfig = field(default_factory=LoraConfig)
    tensorboard: bool = True
    wandb: bool = False
    progress_bar: bool = True
    check_memory: bool = True  # estimate memory before training and refuse a run that cannot fit

    def validate(self) -> None:
        """Raises ValueError for inconsistent settings (called before anything is built)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.save_contents not in ("trainable", "all"):
            raise ValueError(f"train.save_contents must be 'trainable' or 'all', not {self.save_contents!r}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("set train.epochs >= 1 or train.max_steps")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError("train.lr must be > 0 and train.min_lr >= 0")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas needs two values (beta1, beta2), got {list(self.betas)}")
        if self.log_every < 1:
            raise ValueError("train.log_every must be >= 1")
        for name in ("warmup_steps", "keep_last", "save_every_steps", "eval_every", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, not {getattr(self, name)}")


@dataclass
class RunConfig:
    """One YAML file: the model, the data, the training run and the parallel engine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Checks each section and the settings that involve several of them; raises ValueError."""
        self.train.validate()
        self.data.validate()
        self.parallel.validate()
        if self.model.image_size is not None and self.model.image_size != self.data.image_size:
            raise ValueError(f"model.image_size ({self.model.image_size}) and data.image_size ({self.data.image_size}) "
                             "differ: the vision tower takes one size")
        if self.train.lora.enabled and self.model.trainable.language_model:
            raise ValueError("train.lora.enabled trains adapters on a frozen LLM: set model.trainable.language_model"
                             "=false (or disable LoRA to train the whole LLM)")
        if self.model.quantize is not None:
            self._validate_quantized_llm()
        if self.model.float8 and self.model.quantize is not None:
            raise ValueError("model.float8 casts the LLM's bf16 weights to fp8 each step and model.quantize stores "
                             "them quantized: set model.float8=false or model.quantize=null")
        if self.model.float8_weights:
            self._validate_float8_weights()
        if self.parallel.engine != "ddp" and self.train.save_contents != "trainable":
            raise ValueError("the DeepSpeed engines save trained weights only: use train.save_contents=trainable")
        if self.data.packing and self.data.pack_length and "flash" in self.model.attn_implementation:
            # transformers reads sample boundaries from position_ids for flash-attention only in a single row.
            raise ValueError(f"model.attn_implementation={self.model.attn_implementation} takes one packed row per "
                             "micro-batch: set data.pack_length=0 (or leave it unset)")
        if self.parallel.engine == "pipeline" and self.data.val_datasets:
            raise ValueError("the pipeline engine does not evaluate a validation set: remove data.val_datasets")
        if self.parallel.engine == "deepspeed" and self.parallel.zero_stage == 3 and self.data.val_datasets:
            # Ranks evaluate different numbers of batches (and text-only ones skip the image path under no_grad),
            # so ZeRO-3's per-module parameter gathers would fall out of step and hang or abort the run.
            raise ValueError("parallel.engine=deepspeed with parallel.zero_stage=3 cannot evaluate a validation set: "
                             "remove data.val_datasets, or use parallel.zero_stage 0, 1 or 2")
        if self.parallel.engine == "ddp" and self.train.precision == "fp16":
            # The gradient scaler unscales into the gradients, which it refuses to do in fp16 (precision lost and
            # overflow); DeepSpeed keeps fp32 master weights instead, and the pipeline refuses fp16 itself.
            half = [part for part, on in self.model.trainable.as_dict().items()
                    if on and parse_dtype(getattr(self.model.dtypes, part)) == torch.float16]
            if half:
                fix = " ".join(f"model.dtypes.{part}=fp32" for part in half)
                raise ValueError(f"train.precision=fp16 trains fp32 parameters under autocast, but the trainable "
                                 f"parts {half} are stored in fp16: set {fix}, or use train.precision=bf16")
        dtypes = set(vars(self.model.dtypes).values())
        if self.parallel.engine == "deepspeed" and self.train.precision != "fp32" and len(dtypes) > 1:
            # DeepSpeed's bf16/fp16 mode casts every part to that dtype (keeping fp32 master weights of the
            # trained ones), which would silently override model.dtypes.
            raise ValueError(f"parallel.engine=deepspeed with train.precision={self.train.precision} stores every part "
                             f"in that dtype: set all model.dtypes to {self.train.precision} (now {sorted(dtypes)})")

    def _validate_float8_weights(self) -> None:
        """Float8-stored weights: frozen LLM weights cast once (model/float8_weights.py), under DDP, not saved."""
        if not self.model.float8:
            raise ValueError("model.float8_weights stores the weights that model.float8 casts: set model.float8=true")
        if self.model.trainable.language_model:
            raise ValueError("model.float8_weights stores frozen weights once: set model.trainable.language_model="
                             "false (train.lora.enabled=true trains adapters over them)")
        self._require_ddp_and_trainable_saves("model.float8_weights",
                                              engine_why="DeepSpeed manages parameters, and these weights are buffers",
                                              save_why="the LLM's bf16 weights are dropped")

    def _validate_quantized_llm(self) -> None:
        """A quantized LLM trains only frozen, in int8 (int4 kernels have no backward), under DDP, saved without it."""
        quantize = check_mode(self.model.quantize, "model.quantize")
        if self.model.trainable.language_model:
            raise ValueError(f"model.quantize={quantize} freezes the LLM's weights: set model.trainable.language_model"
                             "=false (train.lora.enabled=true trains adapters on the quantized LLM)")
        if quantize == "int4":
            raise ValueError("model.quantize=int4 cannot train: its kernels have no backward, and the projection's "
                             "gradient flows back through the LLM; train with model.quantize=int8")
        self._require_ddp_and_trainable_saves(
            "model.quantize", engine_why="DeepSpeed casts and partitions every parameter, which torchao's quantized "
            "weights do not support", save_why="the quantized LLM is rebuilt from model.llm; `minigpt4qwen export ... "
            "model.quantize=int8` writes a quantized model")

    def _require_ddp_and_trainable_saves(self, option: str, *, engine_why: str, save_why: str) -> None:
        """Raises unless the DDP engine trains and checkpoints hold the trained parts only: what an LLM stored in
        a form of its own (`option`) needs."""
        if self.parallel.engine != "ddp":
            raise ValueError(f"{option} trains with parallel.engine=ddp, not {self.parallel.engine} ({engine_why})")
        if self.train.save_contents != "trainable":
            raise ValueError(f"{option}: use train.save_contents=trainable ({save_why})")
