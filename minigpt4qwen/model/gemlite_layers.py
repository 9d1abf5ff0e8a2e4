"""Quantized Linear layers computed by gemlite's Triton kernels (`--quantize-kernels gemlite`), CUDA only.

torchao's kernels each fit one case: tinygemm's int4 matmul is built for a few rows (a prefill of 64+ rows costs
~5x bf16's), and its int8 weight-only matmul is fast only once inductor fuses the cast into the decode step's
GEMV. gemlite (https://github.com/dropbox/gemlite, the kernels behind torchao's prototype `UIntxWeightOnlyConfig`)
picks a GEMV kernel for one row, a split-K GEMM for a few and a GEMM for many, all reading the packed weight.

The quantization itself does not change: the layers keep torchao's numbers (what `quantize_language_model` and the
exports hold), and `route_through_gemlite` repacks each one for gemlite when a model is loaded for inference:
- int8 (one symmetric scale per output row): the same int8 values and scales, exactly;
- int4 (tinygemm's `(q - 8) * scale + zero`, groups of 128): the same 4-bit values and scales, with gemlite's
  zero `zero - 8 * scale` rounded to bf16 (at most 1/16 of a quantization step off: `int4_parts`'s test).
The repacked layer replaces the Linear (its torchao weight is freed), so a gemlite model is for inference only: it
has no backward and cannot be exported (export the torchao model it was loaded from).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt4qwen.model.int4_many_rows import TILE_PACKED_TYPE, tinygemm_layout_matches, unpack_tile_packed
from minigpt4qwen.model.quantization import INT8_TYPE

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'minigpt4qwen[gemlite]' (gemlite needs triton and a CUDA GPU)"


@functools.cache
def import_gemlite() -> Any:
    """The `gemlite` module, or an ImportError that says how to install it."""
    try:
        import gemlite
    except ImportError as err:
        raise ImportError(f"--quantize-kernels gemlite needs gemlite ({err}): {INSTALL_HINT}") from None
    _load_sibling_config(gemlite)
    _keep_tuned_settings(gemlite)
    # Split-K kernels add their partial sums atomically; on Hopper gemlite adds them in bf16 by default, rounding at
    # each add (and in a varying order). fp32 partial sums, rounded once at the end, stay as close to one bf16
    # matmul's output as the unsplit kernels.
    gemlite.core.set_native_atomic_bfp16(False)
    return gemlite


def _load_sibling_config(gemlite: Any) -> None:
    """gemlite ships tuned kernel settings for some shapes per GPU name (an H100's among them) and autotunes other
    shapes and batch sizes on first use (seconds each). An H200 is an H100's chip with faster memory: it takes the
    H100's settings."""
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else ""
    if "h200" in name:
        configs = Path(gemlite.__file__).parent / "configs"
        gemlite.core.GemLiteLinear.load_config(str(configs / "h100.json"))


def tuned_settings_file() -> Path:
    """Where the kernel settings gemlite tuned on this GPU model are kept between runs:
    `$XDG_CACHE_HOME/minigpt4qwen/gemlite/<gpu-name>.json` (~/.cache by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt4qwen" / "gemlite"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return root / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")


def _keep_tuned_settings(gemlite: Any) -> None:
    """Loads the settings an earlier run tuned (so its shapes and batch sizes are not tuned again) and saves this
    run's at exit, written to a temporary file first so a killed run never leaves a half-written one."""
    path = tuned_settings_file()
    if path.is_file() and gemlite.core.GemLiteLinear.load_config(str(path), print_error=False):
        log.info("gemlite: tuned kernel settings read from %s", path)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            gemlite.core.GemLiteLinear.cache_config(str(partial))
            os.replace(partial, path)
        except Exception as err:  # a read-only home must not fail the run that is ending
            log.warning("gemlite: could not save its tuned kernel settings to %s: %s", path, err)

    atexit.register(save)


def gemlite_from_int8(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A gemlite layer over torchao's per-row int8 weight: its int8 values and row scales as they are."""
    gemlite = import_gemlite()
    scale = weight.scale.reshape(-1, 1)
    if scale.shape[0] != weight.shape[0]:
        raise ValueError(f"expected one int8 scale per output row, got scales {tuple(weight.scale.shape)} for a "
                         f"{tuple(weight.shape)} weight")
    return gemlite.helper.A16W8(device=weight.device, dtype=dtype).from_weights(weight.qdata, bias=bias,
                                                                               scales=scale)


def int4_parts(packed: torch.Tensor, scale_and_zero: torch.Tensor, shape: tuple[int, int], group: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tinygemm tile-packed int4 weight as gemlite takes it: the 4-bit values `[n, k]` (uint8), the group scales
    and gemlite's zeros `[n, k / group]` (fp32), so that gemlite's `q * scale - zeros * scale` is tinygemm's
    `(q - 8) * scale + zero` (`zeros = 8 - zero / scale`).

    Args:
        packed: `[n / 8, k / 128, 32, 4]` int32 and scale_and_zero: `[k / group, n, 2]`, both of the padded shape;
        shape: the weight's own (n, k); group: inputs per scale.
    """
    n, k = shape
    if k % group:
        raise ValueError(f"{k} inputs do not split into groups of {group}")
    values = unpack_tile_packed(packed)[:n, :k].to(torch.uint8)
    # The weight's own rows and groups: with the padding's groups kept, a one-group weight would look grouped to
    # gemlite, which would then read its zeros in the wrong form.
    scale = scale_and_zero[: k // group, :n, 0].t().float()
    zero = scale_and_zero[: k // group, :n, 1].t().float()
    return values, scale, 8 - zero / scale


def gemlite_from_tile_packed_int4(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A gemlite layer over a tinygemm tile-packed int4 weight: the same 4-bit values and group scales, the zero
    point in gemlite's form (`int4_parts`)."""
    gemlite = import_gemlite()
    if not tinygemm_layout_matches(str(weight.device)):  # the layout is an ATen internal: checked, as for prefills
        raise ValueError("this torch's int4 packing is not the layout model/int4_many_rows.py reads: use "
                         "--quantize-kernels torchao")
    values, scale, zeros = int4_parts(weight.qdata, weight.scale_and_zero, tuple(weight.shape),
                                      weight.block_size[-1])
    return gemlite.helper.A16Wn(device=weight.device, dtype=dtype).from_weights(
        values, scale.to(dtype), zeros, 4, weight.block_size[-1], bias=bias)


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
    # Only the parents are listed: each replaced layer (its torchao weight) is freed as soon as it is replaced, so
    # the GPU holds one layer in both forms at a time, not the whole LLM (14B int4 on an H100: 22.2 GiB at load).
    parents = [m for m in module.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    for parent in parents:
        for name in [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]:
            if (fast := to_gemlite(getattr(parent, name))) is not None:
                setattr(parent, name, fast)
                replaced += 1
    log.info("%d quantized layers run on gemlite's kernels", replaced)
    return replaced
