"""Frozen LLM weights stored in float8 for training (`model.float8_weights`): half the memory of bf16 weights, the
same matmuls as `model.float8`.

`model.float8` (torchao's float8 training, `model/float8.py`) keeps each weight in bf16 and casts it to e4m3 with
one dynamic scale per tensor on every call. For a frozen weight that cast gives the same bits every step, so
`store_float8_weights` does it once: each converted layer keeps the e4m3 bits and their scale and drops the bf16
weight. The layer then hands torchao's matmul (`matmul_with_hp_or_float8_args`, which takes an already-cast
weight) the stored cast: forward and gradient to the input are bitwise those of `model.float8`, and a 7B LLM's
blocks hold 6.5 GB instead of 13 GB, which is what lets a 24 GB card train at larger micro-batches.

What it gives up: the bf16 weights are gone from the model, so a checkpoint of every weight (`train.save_contents
=all`), an export of the trained model with its LLM, or DeepSpeed (which manages parameters, not these buffers)
cannot run with it; training saves the trained parts, as the published recipe does. The bits are stored as uint8
buffers (not saved in state dicts), which every process group and `.to()` can move; dtype casts of the module
(`.half()`) leave both the bits and their fp32 scale as they are.

Loading: `store_loaded_weights_in_float8` stores each weight as soon as its shard is in (the Qwen1 loader calls it
per shard), so a 14B LLM reaches a 24 GB card without the host or the card holding its 28 GB of bf16 weights. LoRA
must wrap the bf16 Linears first: then `apply_float8` and `store_float8_weights` run after the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt4qwen.model.activation_checkpointing import decoder_layers
from minigpt4qwen.model.float8 import float8_recipe, float8_targets


class Float8WeightLinear(nn.Module):
    """A frozen Linear computing as torchao's `Float8Linear` from a weight cast to float8 once."""

    def __init__(self, linear: nn.Module, device: torch.device | str | None = None):
        """Takes a torchao `Float8Linear` with a frozen weight (its bf16 weight is not kept); casts it on `device`
        (None: where it is), where the bits then stay."""
        super().__init__()
        from torchao.float8.config import ScalingGranularity, ScalingType
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        if linear.weight.requires_grad:
            raise ValueError("model.float8_weights stores frozen weights only, but this Linear's weight trains")
        weight_casts = (linear.config.cast_config_weight, linear.config.cast_config_weight_for_grad_input)
        # One stored cast serves the forward and the gradient to the input: exact only for one dynamic scale per
        # tensor, the same for both, not rounded to a power of 2 (the recipe `apply_float8` converts with).
        if (weight_casts[0] != weight_casts[1] or weight_casts[0].scaling_type is not ScalingType.DYNAMIC
                or weight_casts[0].scaling_granularity is not ScalingGranularity.TENSORWISE
                or linear.config.round_scales_to_power_of_2):
            raise ValueError(f"model.float8_weights stores one per-tensor cast of each weight, but this Linear's "
                             f"float8 recipe differs: {linear.config}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.config, self.linear_mm_config = linear.config, linear.linear_mm_config
        cast = hp_tensor_to_float8_dynamic(linear.weight.detach().to(device),
                                           self.config.cast_config_weight.target_dtype, self.linear_mm_config,
                                           gemm_input_role=GemmInputRole.WEIGHT)
        self.float8_dtype, self.weight_dtype = cast._data.dtype, linear.weight.dtype
        self.register_buffer("weight_bits", cast._data.view(torch.uint8), persistent=False)
        self.register_buffer("weight_scale", cast._scale, persistent=False)
        self.bias = linear.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

        # Float8Linear casts the input to CUDA autocast's dtype (the matmul's output takes the input's dtype); the
        # same here, and CPU autocast likewise (CPU tests).
        device_type = "cuda" if input.is_cuda else "cpu"
        if torch.is_autocast_enabled(device_type):
            input = input.to(torch.get_autocast_dtype(device_type))
        weight = Float8TrainingTensor(self.weight_bits.view(self.float8_dtype), self.weight_scale, self.weight_dtype,
                                      self.linear_mm_config, GemmInputRole.WEIGHT)
        output = matmul_with_hp_or_float8_args.apply(input, weight.t(), self.linear_mm_config, self.config)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` would cast the fp32 scale, which `_scaled_mm` refuses: it keeps its dtype (the
        # bits are uint8, which float casts leave alone). Device moves apply to both.
        scale = self.weight_scale
        result = super()._apply(fn, recurse)
        self.weight_scale = self.weight_scale.to(scale.dtype)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.float8_dtype}"


def store_float8_weights(language_model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replaces, in place, every torchao `Float8Linear` inside the decoder blocks whose weight is frozen by a
    `Float8WeightLinear` (call after `apply_float8`, before compiling); returns how many were replaced. One layer at
    a time: memory only shrinks.

    Args:
        language_model: the LLM, e.g. built on the host.
        device: where to cast and keep the float8 weights (a bf16 LLM on the host reaches the GPU one weight at a
            time, already float8, and casts as it would every step there); None: where each weight is.
    """
    from torchao.float8.float8_linear import Float8Linear

    planned = [(parent, name) for parent in decoder_layers(language_model).modules()
               for name, child in parent.named_children()
               if type(child) is Float8Linear and not child.weight.requires_grad]
    for parent, name in planned:
        setattr(parent, name, Float8WeightLinear(getattr(parent, name), device))
    return len(planned)


def store_loaded_weights_in_float8(language_model: nn.Module, device: torch.device | str | None = None) -> int:
    """Stores in float8 every weight `apply_float8` then `store_float8_weights` would, as soon as it is loaded: each
    float8 target (`float8_targets`) whose weight is off the meta device becomes a `Float8WeightLinear` on `device`,
    by way of torchao's `Float8Linear` in `apply_float8`'s recipe, so the bits are the same. Loaders call it after
    each shard (`model.float8_weights` without LoRA): no device, nor the host, ever holds every bf16 weight.

    The weights are frozen here: a caller stores them only for an LLM that does not train.

    Args:
        language_model: the causal LM, possibly still partly on meta (a load in progress).
        device: where to cast and keep the float8 weights; None: where each weight is.

    Returns:
        The number of layers stored by this call.
    """
    from torchao.float8.float8_linear import Float8Linear

    layers = decoder_layers(language_model)
    done = 0
    for name, linear in float8_targets(language_model).items():
        if linear.weight.is_meta:
            continue
        linear.weight.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        stored = Float8WeightLinear(Float8Linear.from_float(linear, config=float8_recipe()), device)
        setattr(layers.get_submodule(parent), child, stored)
        done += 1
    return done


def float8_weight_buffer_names(module: nn.Module) -> list[str]:
    """The full names of the float8 weights' buffers in `module` (what DDP must not broadcast)."""
    return [f"{name}.{buffer}" for name, child in module.named_modules() if isinstance(child, Float8WeightLinear)
            for buffer in ("weight_bits", "weight_scale")]
