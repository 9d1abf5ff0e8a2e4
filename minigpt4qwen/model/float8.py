"""Float8 matmuls in the LLM's decoder blocks for training (`model.float8`), by torchao's float8 training.

What runs in float8: the forward matmul and the gradient to the input (and, for a trainable LLM, to the weight)
of every Linear inside the LLM's decoder blocks (attention and MLP projections), with torchao's default recipe:
one dynamic scale per tensor, e4m3 for activations and weights, e5m2 for gradients. Weights stay stored in their
own dtype and are cast every step, so checkpoints and exports do not change. Left in high precision: the output
head (the loss reads its logits), the embeddings and norms, the vision tower, the Q-Former, the trained
projection, LoRA adapters (rank-wide matmuls gain nothing) and any Linear with a dimension that is not a multiple
of 16 (what fp8 GEMMs take).

What it costs, in torchao 0.18:
- In eager mode the weight gradient is computed even for a frozen weight: `matmul_with_hp_or_float8_args.backward`
  (torchao/float8/float8_linear.py) never reads `ctx.needs_input_grad`, so a frozen LLM pays one fp8 matmul of
  three per layer (and two casts) whose result autograd drops. Compiled blocks do not: the compiler drops the
  unused matmul. A layer that cast frozen weights once and skipped that matmul was measured (one H100, 7B,
  compiled, micro-batch 64: 103.3 samples/s vs torchao's 105.0, peak 73.1 vs 67.1 GiB for the fp8 copies) and
  removed: no faster, 1 byte per weight larger (it kept the bf16 weights too). `model.float8_weights`
  (`model/float8_weights.py`) casts once and drops the bf16 weights instead: torchao's matmuls, half the memory.
- That weight-gradient matmul runs over the tokens, and CUDA's `torch._scaled_mm` wants its inner dimension a
  multiple of 16: `pad_inner_dim` zero-pads it, so any micro-batch shape trains (in eager mode at the price of one
  copy of each fp8 operand).
- Casts and scales are separate kernels in eager mode; torchao's speed-ups assume torch.compile, so pair it with
  `model.compile_blocks=true` (the training entry converts before it compiles).

The conversion is a module swap inside the blocks, so every engine takes it: DDP, DeepSpeed ZeRO and the pipeline
(ZeRO-2, ZeRO-3 and the pipeline checked once on 2 CPU processes: the same losses as one process).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minigpt4qwen.model.activation_checkpointing import decoder_layers
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.quantization import INSTALL_HINT, is_quantized

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have fp8 tensor cores
FP8_ALIGNMENT = 16  # torch._scaled_mm takes matrices whose dimensions are multiples of 16


def check_float8_support(device: torch.device, *, allow_cpu: bool = False) -> None:
    """Raises unless float8 matmuls can run on `device` (CUDA compute capability 8.9+) with torchao installed;
    `allow_cpu` accepts the CPU, where torch's `_scaled_mm` rounds the same way (tests: no speed)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        problem = None if (major, minor) >= FP8_MIN_CAPABILITY else f"{name} is sm_{major}{minor}"
    else:
        problem = None if allow_cpu and device.type == "cpu" else f"the model trains on {device.type}"
    if problem:
        raise RuntimeError(f"model.float8 needs an Ada or Hopper GPU (CUDA compute capability 8.9+: L4, L40S, "
                           f"RTX 4090, H100, H200) and torchao ({INSTALL_HINT}), but {problem}: set model.float8=false")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as err:
        raise ImportError(f"model.float8 needs torchao's float8 training ({err}): {INSTALL_HINT}") from None


def float8_recipe() -> Any:
    """torchao's `Float8LinearConfig` every float8 layer is converted with (`apply_float8` and the float8-stored
    weights alike, so both give the same bits): the default per-tensor recipe, inner dimension padded."""
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig(pad_inner_dim=True)


def float8_targets(language_model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers `apply_float8` converts, by name inside the decoder blocks ("3.mlp.down_proj"): every plain
    `nn.Linear` of the LLM's blocks with both dimensions multiples of 16, except LoRA adapters."""
    targets = {}
    for name, module in decoder_layers(language_model).named_modules():
        # Exactly nn.Linear: one already converted (torchao's Float8Linear subclasses it) is left alone.
        if type(module) is not nn.Linear or ".lora_" in f".{name}":
            continue
        if module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0:
            targets[name] = module
    return targets


def apply_float8(model: MiniGPT4Qwen, *, device: torch.device | None = None, allow_cpu: bool = False) -> int:
    """Swaps the LLM blocks' Linear layers (`float8_targets`) for torchao's `Float8Linear`, in place; call it after
    LoRA and before `compile_blocks`. Parameters stay the same objects (an optimizer built before still holds them).

    Args:
        model: the model, LLM weights in bf16 (or fp32), not quantized.
        device: where it trains (the pipeline engine builds the model on the CPU); None: where the LLM's weights are.
        allow_cpu: accept the CPU (see `check_float8_support`).

    Returns:
        The number of Linear layers converted.

    Raises:
        RuntimeError / ImportError: see `check_float8_support`.
        ValueError: quantized LLM weights (`model.quantize`), or no layer the fp8 GEMM can take.
    """
    device = torch.device(device) if device is not None else next(model.language_model.parameters()).device
    check_float8_support(device, allow_cpu=allow_cpu)
    from torchao.float8 import convert_to_float8_training

    if any(is_quantized(p) for p in model.language_model.parameters()):
        raise ValueError("model.float8 casts the LLM's bf16 weights to fp8 each step; its weights are quantized "
                         "(model.quantize): set one of model.float8=false or model.quantize=null")
    targets = float8_targets(model.language_model)
    if not targets:
        raise ValueError(f"model.float8: no Linear layer in the LLM's blocks is left to convert (none unconverted "
                         f"with both dimensions multiples of {FP8_ALIGNMENT}): set model.float8=false")
    chosen = {id(module) for module in targets.values()}
    convert_to_float8_training(decoder_layers(model.language_model), config=float8_recipe(),
                               module_filter_fn=lambda module, _fqn: id(module) in chosen)
    return len(targets)
