"""Quantized Linear layers computed by gemlite's Triton kernels (`quantize_kernels: gemlite`), CUDA only.

torchao's kernels each fit one case: tinygemm's int4 matmul is built for a few rows (a prefill of 64+ rows costs
~5x bf16's), and its int8 weight-only matmul is fast only once inductor fuses the cast into the decode step's
GEMV. gemlite (https://github.com/dropbox/gemlite, the kernels behind torchao's prototype `UIntxWeightOnlyConfig`)
picks a GEMV kernel for one row, a split-K GEMM for a few and a GEMM for many, all reading the packed weight.

The quantization itself does not change: the layers keep torchao's numbers (what `quantize_language_model` and the
exports hold), and `route_through_gemlite` repacks each one for gemlite when a model is loaded for inference:
- int8 (one symmetric scale per output row): the same int8 values and scales, exactly;
- int4 (tinygemm's `(q - 8) * scale + zero`, groups of 128): the same 4-bit values and scales, with gemlite's
  zero `zero - 8 * scale` rounded to bf16 (at most ~1/60 of a quantization step off).
The repacked layer replaces the Linear (its torchao weight is freed), so a gemlite model is for inference only: it
has no backward and cannot be exported (export the torchao model it was loaded from).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt4qwen.model.int4_many_rows import TILE_PACKED_TYPE, unpack_tile_packed

log = logging.getLogger(__name__)
INT8_TYPE = "Int8Tensor"  # torchao's per-row int8 weight (qdata [N, K] int8, scale [N, 1])
INSTALL_HINT = "pip install 'minigpt4qwen[gemlite]' (gemlite needs triton and a CUDA GPU)"


@functools.cache
def import_gemlite() -> Any:
    """The `gemlite` module, or an ImportError that says how to install it."""
    try:
        import gemlite
    except ImportError as err:
        raise ImportError(f"quantize_kernels=gemlite needs gemlite ({err}): {INSTALL_HINT}") from None
    _load_sibling_config(gemlite)
    return gemlite


def _load_sibling_config(gemlite: Any) -> None:
    """gemlite ships tuned kernel settings per GPU name (an H100's among them) and autotunes every shape and batch
    size on others, for minutes. An H200 is an H100's chip with faster memory: it takes the H100's settings."""
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else ""
    if "h200" in name:
        configs = Path(gemlite.__file__).parent / "configs"
        gemlite.core.GemLiteLinear.load_config(str(configs / "h100.json"))


def gemlite_from_int8(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A gemlite layer over torchao's per-row int8 weight: its int8 values and row scales as they are."""
    gemlite = import_gemlite()
    scale = weight.scale.reshape(-1, 1)
    if scale.shape[0] != weight.shape[0]:
        raise ValueError(f"expected one int8 scale per output row, got scales {tuple(weight.scale.shape)} for a "
                         f"{tuple(weight.shape)} weight")
    return gemlite.helper.A16W8(device=weight.device, dtype=dtype).from_weights(weight.qdata, bias=bias,
                                                                               scales=scale)


def gemlite_from_tile_packed_int4(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A gemlite layer over a tinygemm tile-packed int4 weight: the same 4-bit values and group scales, its zero
    point in gemlite's form (`q * scale + zero'` with `zero' = zero - 8 * scale`)."""
    gemlite = import_gemlite()
    n, k = weight.shape
    group = weight.block_size[-1]
    values = unpack_tile_packed(weight.qdata)[:n, :k].to(torch.uint8)
    scale = weight.scale_and_zero[..., 0].t()[:n].float()  # [n, k / group]
    zero = weight.scale_and_zero[..., 1].t()[:n].float()
    # gemlite's fma form stores -zeros * scales: zeros = 8 - zero / scale gives zero - 8 * scale.
    gemlite_zeros = 8 - zero / scale
    return gemlite.helper.A16Wn(device=weight.device, dtype=dtype).from_weights(
        values, scale.to(dtype), gemlite_zeros, 4, group, bias=bias)


def to_gemlite(linear: nn.Linear) -> nn.Module | None:
    """The gemlite layer computing `linear` (a torchao int8 or tile-packed int4 weight on CUDA); None for any other
    layer."""
    weight = linear.weight
    if not weight.is_cuda:
        return None
    kind = type(weight).__name__
    bias = None if linear.bias is None else linear.bias.detach()
    with torch.no_grad():
        if kind == INT8_TYPE:
            return gemlite_from_int8(weight, bias, weight.dtype)
        if kind == TILE_PACKED_TYPE:
            return gemlite_from_tile_packed_int4(weight, bias, weight.dtype)
    return None


def route_through_gemlite(module: nn.Module) -> int:
    """Replaces every Linear under `module` with a torchao int8 or tile-packed int4 weight by its gemlite layer
    (`to_gemlite`); returns how many it replaced.

    Raises:
        ImportError: gemlite is missing.
    """
    import_gemlite()
    replaced = 0
    for child in list(module.modules()):
        for child_name, layer in list(child.named_children()):
            if isinstance(layer, nn.Linear) and (fast := to_gemlite(layer)) is not None:
                setattr(child, child_name, fast)
                replaced += 1
    log.info("%d quantized layers run on gemlite's kernels", replaced)
    return replaced
