"""int4 Linear layers whose many-row calls (a prefill) run as a bf16 matmul over a dequantized copy of the weight.

torchao's CUDA int4 weights (`Int4TilePackedTo4dTensor`, tinygemm's tile-packed layout) multiply through
`aten._weight_int4pack_mm`, a kernel built for a few rows: its time grows with the rows, so at the 64 rows of a
prefill it costs ~5x a bf16 matmul of the same shape (`benchmarks/quant_matmul.py`, 14B shapes on an H100), and
a 14B int4 model's first token is 93% prefill. At `DEQUANT_MIN_ROWS` rows or more, `ManyRowInt4Linear` instead
unpacks the weight into a bf16 temporary (one compiled elementwise kernel: it reads the int4 weight once and
writes the bf16 one) and runs the bf16 matmul; fewer rows (decode steps) keep tinygemm. Only one layer's
temporary exists at a time.

The tile-packed layout is the one `aten._convert_weight_to_int4pack` writes on CUDA with 8 inner k-tiles (the
only one torchao uses): for weight rows n and input columns k, padded to multiples of 8 and 1024,
`packed[n // 8, k // 128, lane, j]` is an int32 holding 8 of the weight's 4-bit values, where the tensor-core lane
`lane = 4 * (n % 8) + (k % 8) // 2` and `j = (k % 128) // 32`; nibble `4 * h + 2 * i2 + i1` of it holds column
`128 * (k // 128) + 32 * j + 16 * i2 + 8 * i1 + 2 * (lane % 4) + h`. A weight value is
`(q - 8) * scale + zero`, with scale and zero per group of `group_size` columns (`scale_and_zero[group, n]`).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4qwen.model.linear_over import LinearOver

# From this many rows on, the dequantized path beats tinygemm. Its cost hardly depends on the rows (14B shapes, one
# H100: dequantization + bf16 matmul 0.25 ms for qkv, 0.38 for gate+up, 0.41 for down), while tinygemm's grows with
# them (32 rows: 0.27, 0.40, 0.22; 64 rows: 0.46, 0.72, 0.39): about even at 32 rows, a clear gain from ~48 for the
# larger layers (benchmarks/RESULTS.md; `python -m benchmarks.quant_matmul` prints both int4 paths by rows).
DEQUANT_MIN_ROWS = 48
TILE_PACKED_TYPE = "Int4TilePackedTo4dTensor"  # torchao's class name, checked without importing torchao
INNER_K_TILES = 8  # the packing torchao uses; the layout below assumes it
log = logging.getLogger(__name__)


def unpack_tile_packed(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values (0..15, int32) of a tile-packed weight, as a `[n, k]` matrix of its padded shape.

    Args:
        packed: `[n / 8, k / 128, 32, 4]` int32, as `aten._convert_weight_to_int4pack(w, 8)` returns.
    """
    n_tiles, k_tiles, lanes, words = packed.shape
    if lanes != 32 or words != INNER_K_TILES // 2:
        raise ValueError(f"not a tile-packed int4 weight with {INNER_K_TILES} inner k-tiles: shape "
                         f"{tuple(packed.shape)}")
    # One shift by a tensor of amounts: compiled, each element loads its word once (a stack of 8 constant shifts
    # compiles to 8 masked loads per element, 1.7x slower on an H100).
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    # Name the index parts: lane = (row in tile, k pair in tile), nibble = (odd column, k-tile half, 8-column half).
    nibbles = nibbles.view(n_tiles, k_tiles, 8, 4, words, 2, 2, 2)
    #                      tile   k128    row kpair word  odd  half16 half8
    columns_in_order = nibbles.permute(0, 2, 1, 4, 6, 7, 3, 5)
    return columns_in_order.reshape(n_tiles * 8, k_tiles * 128)


def dequantize_tile_packed(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
                           shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The bf16 weight of a tile-packed int4 weight and its tinygemm scales and zeros (`[k / group_size, n, 2]`).

    Args:
        shape: the weight's own (out, in) shape, a corner of the padded one; None: the whole padded `[n, k]`.
    """
    values = unpack_tile_packed(packed)
    n, k = values.shape
    scale = scale_and_zero[..., 0].t().repeat_interleave(group_size, dim=1)
    zero = scale_and_zero[..., 1].t().repeat_interleave(group_size, dim=1)
    if scale.shape != (n, k):
        raise ValueError(f"scales and zeros {tuple(scale_and_zero.shape)} do not cover a {n} x {k} weight in "
                         f"groups of {group_size}")
    if shape is not None:  # sliced before the arithmetic, so padding is never computed
        values, scale, zero = (part[: shape[0], : shape[1]] for part in (values, scale, zero))
    return ((values.float() - 8) * scale.float() + zero.float()).to(torch.bfloat16)


@functools.cache
def _compiled_dequantize():
    # One fused kernel: eager, the unpacking passes over the weight's memory several times (4.7 ms for a 14B qkv
    # weight on an H100). Sizes are static: with symbolic ones every element's index needs 64-bit divisions by
    # runtime sizes (0.62 ms); with constant ones they are shifts and masks (0.17 ms; reading the int4 and writing
    # the bf16 weight takes 0.066 at the card's bandwidth). A model has a handful of quantized layer shapes (4 in a
    # Qwen LLM with fused projections), each compiled once; past dynamo's recompile limit a new shape would run
    # eagerly, correct but slower (no `fullgraph`, which would make that an error; the tests check there is no
    # graph break).
    return torch.compile(dequantize_tile_packed, dynamic=False)


def dequantize_int4_weight(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 matrix of a torchao tile-packed int4 weight, in its own (unpadded) shape; on CUDA through one
    compiled kernel per weight shape (inside a compiled caller, the caller's compile fuses it)."""
    own_compile = weight.is_cuda and not torch.compiler.is_compiling()
    dequantize = _compiled_dequantize() if own_compile else dequantize_tile_packed
    with torch.no_grad():  # frozen weights (int4 has no backward); one grad mode, one compile
        return dequantize(weight.qdata, weight.scale_and_zero, weight.block_size[-1], tuple(weight.shape))


class ManyRowInt4Linear(LinearOver):
    """`nn.Linear` over a tile-packed int4 weight (same parameters, same state dict keys) that computes calls of
    `DEQUANT_MIN_ROWS` rows or more through the dequantized weight. Build it with `from_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight, bias)`: through the dequantized weight for many rows, through tinygemm otherwise."""
        if x.numel() >= DEQUANT_MIN_ROWS * self.in_features:
            return F.linear(x, dequantize_int4_weight(self.weight).to(x.dtype), self.bias)
        return F.linear(x, self.weight, self.bias)


@functools.cache
def tinygemm_layout_matches(device: str) -> bool:
    """Whether this torch's tinygemm packing and scales are what `dequantize_int4_weight` reads, and it compiles,
    checked once per device: a small weight packed by ATen and multiplied by tinygemm against the identity (which
    returns the weight itself) vs our compiled dequantization of it. The layout is an ATen internal, so it is
    checked, not assumed; any failure (a missing op, a compile error) answers False."""
    from torch.utils._triton import has_triton

    if not has_triton():
        log.warning("int4 prefills use tinygemm (slower at many rows): torch.compile has no Triton here")
        return False
    gen = torch.Generator().manual_seed(0)
    n, k, group = 16, 256, 128
    values = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    as_bytes = ((values[:, ::2] << 4) | values[:, 1::2]).to(torch.uint8)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes.to(device), INNER_K_TILES)
        scale_and_zero = (torch.rand(k // group, n, 2, generator=gen) + 0.5).to(device, torch.bfloat16)
        identity = torch.eye(k, device=device, dtype=torch.bfloat16)
        by_tinygemm = torch.ops.aten._weight_int4pack_mm(identity, packed, group, scale_and_zero).t()
        with torch.no_grad():
            ours = _compiled_dequantize()(packed, scale_and_zero, group, (n, k))
    except Exception as err:  # noqa: BLE001  (whatever fails here, tinygemm alone still works)
        log.warning("int4 prefills use tinygemm: checking the dequantized path failed (%s: %s)",
                    type(err).__name__, err)
        return False
    # Scales are >= 0.5, so a misplaced value is off by >= 0.5; the paths differ by a bf16 rounding step at most.
    if not torch.allclose(ours.float(), by_tinygemm.float(), rtol=0.02, atol=0.02):
        log.warning("int4 prefills use tinygemm: this torch's int4 packing is not the layout "
                    "model/int4_many_rows.py reads")
        return False
    return True


def route_many_rows_through_bf16(module: nn.Module) -> int:
    """Replaces every `nn.Linear` under `module` whose weight is tile-packed int4 by a `ManyRowInt4Linear` (same
    parameters); returns how many it replaced. 0 on a model with no such weights (e.g. int4 on the CPU), and where
    the dequantized path fails its checks (`tinygemm_layout_matches`, logged once): those keep tinygemm for every
    call."""
    targets = [(name, child) for name, child in module.named_modules()
               if type(child) is nn.Linear and type(child.weight).__name__ == TILE_PACKED_TYPE
               and getattr(child.weight, "act_pre_scale", None) is None]  # we would not scale the input
    if not targets or not tinygemm_layout_matches(str(targets[0][1].weight.device)):
        return 0
    for name, child in targets:
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attribute, ManyRowInt4Linear.from_linear(child))
    return len(targets)
