"""Float8 matmuls for a frozen Linear layer: its weight cast to float8 once, and a backward that computes only the
gradient to the input.

torchao's float8 training (`model/float8.py`) is made for weights that train: it casts each weight to fp8 at every
step, saves each layer's input for the weight's gradient, and its backward computes that gradient even when the
weight is frozen. With the published recipe the whole LLM is frozen, so per Linear layer and step that is one fp8
matmul of three thrown away, two casts of an unchanging weight, and one saved activation nobody reads.
`FrozenFloat8Linear` does what a frozen weight needs: forward `x_fp8 @ W_fp8^T`, backward `grad_fp8 @ W_fp8`, with
W cast once at conversion, and nothing saved per call. The fp8 GEMM wants its second operand column-major: the
forward reads the kept [out, in] copy as W^T; the backward transposes it into a temporary (one byte per weight read
and written: a few milliseconds per step at 7B, against a third of the step's LLM matmuls saved). The recipe is
torchao's default: one dynamic scale per tensor, e4m3 for activations and weights, e5m2 for gradients.

Memory: the fp8 copy adds 1 byte per weight beside the frozen bf16 weight, which stays the module's parameter
(state dicts, checkpoints and exports read it; the copy is a non-persistent buffer). A weight that
changes after conversion is not seen by the copies: convert after loading, and only frozen weights.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_FLOOR = 1e-12  # an all-zero tensor still gets a finite scale
BUFFER_NAMES = ("weight_float8", "weight_scale")  # stored as bytes (see FrozenFloat8Linear)


def to_float8(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`tensor` scaled so its absolute maximum meets `dtype`'s largest value, then cast (saturating).

    Returns:
        The fp8 values and the fp32 scalar that multiplies them back (what `torch._scaled_mm` takes).
    """
    limit = torch.finfo(dtype).max
    scale = limit / tensor.detach().abs().amax().float().clamp(min=AMAX_FLOOR)
    return (tensor.float() * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


class _FrozenFloat8Matmul(torch.autograd.Function):
    """`input @ W^T` with fp8 operands; its backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, input.shape[-1]).contiguous()  # the GEMM's first operand must be row-major
        values, scale = to_float8(rows, E4M3)
        # _scaled_mm wants its second operand column-major: W [out, in] row-major, seen as W^T [in, out].
        out = torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=input.dtype)
        ctx.save_for_backward(weight, weight_scale)
        return out.reshape(*input.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, weight_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        values, scale = to_float8(rows, E5M2)
        column_major = weight.t().contiguous().t()  # W [out, in], laid out as the GEMM's second operand wants
        grad_input = torch._scaled_mm(values, column_major, scale_a=scale, scale_b=weight_scale, out_dtype=grad.dtype)
        return grad_input.reshape(*grad.shape[:-1], grad_input.shape[-1]), None, None


class FrozenFloat8Linear(nn.Module):
    """A frozen `nn.Linear` whose matmuls run in fp8 (see the module docstring); same parameters, same outputs up to
    fp8 rounding. Under autocast the input is cast to the autocast dtype first, as `F.linear` would.

    Args:
        linear: the layer to replace; its weight must not require a gradient.

    Raises:
        ValueError: a weight that trains (use torchao's `Float8Linear`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.requires_grad:
            raise ValueError("FrozenFloat8Linear casts its weight once: it takes frozen weights only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        values, scale = to_float8(linear.weight.detach(), E4M3)
        # Kept as bytes: `module.half()` / `.to(bfloat16)` (older DeepSpeed releases cast whole modules so) convert
        # every floating-point buffer, and fp8 counts as one; an fp8 weight or scale turned bf16 would break the GEMM.
        self.register_buffer("weight_float8", values.view(torch.uint8), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1).view(torch.uint8), persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        device = input.device.type
        if torch.is_autocast_enabled(device):
            input = input.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            out = _FrozenFloat8Matmul.apply(input, self.weight_float8.view(E4M3),
                                            self.weight_scale.view(torch.float32)[0])
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def float8_buffer_names(model: nn.Module) -> list[str]:
    """The fp8 weight copies of `model`'s `FrozenFloat8Linear` layers, by state-dict name (DDP must not broadcast
    them every step: every rank casts the same frozen weights)."""
    return [f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, FrozenFloat8Linear)
            for buffer in BUFFER_NAMES]
