"""Stacking the output rows of torchao quantized weights: the fused projection of quantized q/k/v or gate/up.

Every mode of `model/quantization.py` quantizes each output row on its own (int8: one scale per row; int4: groups
along the input within a row), so the quantized weight of `cat([w_q, w_k, w_v])` is the quantized q, k and v
weights' parts stacked: exact, with no dequantizing and requantizing, as long as the packed layout keeps rows
apart. What "stacked" means per torchao class is declared in `ROW_DIMS`: for each tensor field, the dimension that
indexes output rows (or tiles of 8 rows, in tinygemm's tile-packed layout, whose scales and zeros are
`[groups, rows, 2]`); `ROW_BLOCKS` names layouts that pack several rows together, whose parts must fill whole
blocks. A class not listed, or weights with extra parts, padding rows or partial blocks, are not stacked
(`stacking_problem` says why; the caller leaves the projections separate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# torchao class name -> {tensor field: its output-row dimension}. Non-tensor attributes are copied (they must be
# equal across the stacked weights), except `shape`, which is recomputed.
ROW_DIMS = {
    "Int8Tensor": {"qdata": 0, "scale": 0, "zero_point": 0},  # int8: per-row scales and (zero) zero points [N, 1]
    "Int4TilePackedTo4dTensor": {"qdata": 0, "scale_and_zero": 1},  # CUDA int4: [N / 8, K / 128, 32, 4]
    "Int4OpaqueTensor": {"qdata": 0, "scale_and_zero": 1},  # CPU int4: [N, K / 2], in blocks of rows (below)
}
# Output rows per index of `qdata`'s row dimension (1 where not listed): padding rows would break the stacking.
ROWS_PER_QDATA_INDEX = {"Int4TilePackedTo4dTensor": 8}
# Rows packed together (k-major within the block): every part but the last must fill whole blocks. ATen's CPU int4
# packing uses blocks of 64 rows with AVX-512 and 32 with AVX2; 64 covers both.
ROW_BLOCKS = {"Int4OpaqueTensor": 64}


def _attributes(weight: torch.Tensor) -> dict:
    names = [*weight.tensor_attribute_names, *getattr(weight, "optional_tensor_attribute_names", [])]
    return {name: getattr(weight, name) for name in names if name != "shape"}


def stacking_problem(weights: Sequence[torch.Tensor]) -> str | None:
    """Why `weights` (torchao quantized weights, in output order) cannot be stacked into one, or None."""
    kind = type(weights[0]).__name__
    if kind not in ROW_DIMS or any(type(w) is not type(weights[0]) for w in weights):
        return f"quantized weights of {sorted({type(w).__name__ for w in weights})}, not one of {sorted(ROW_DIMS)}"
    stacked = ROW_DIMS[kind]
    if any(getattr(w, name, None) is not None for w in weights
           for name in getattr(w, "optional_tensor_data_names", []) if name not in stacked):
        return "quantized weights with extra parts (activation scales, DA8W4 zero points)"
    if any(w.block_size[0] != 1 for w in weights):
        return "quantized weights without per-row scales"
    if any(len({getattr(w, name, None) is None for w in weights}) > 1 for name in stacked):
        return "quantized weights with and without zero points"
    if any(_attributes(w) != _attributes(weights[0]) for w in weights) or len({w.shape[1] for w in weights}) > 1:
        return "quantized weights with different schemes or input sizes"
    rows = ROWS_PER_QDATA_INDEX.get(kind, 1)
    if any(w.qdata.shape[0] * rows != w.shape[0] for w in weights):
        return "quantized weights whose rows are padded"
    if any(w.shape[0] % ROW_BLOCKS.get(kind, 1) for w in weights[:-1]):
        return f"quantized weights packed in blocks of {ROW_BLOCKS.get(kind)} rows that the parts do not fill"
    return None


def stack_rows(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The quantized weight whose rows are `weights`' rows, in order (the parts are copied once).

    Raises:
        ValueError: `stacking_problem(weights)`.
    """
    if problem := stacking_problem(weights):
        raise ValueError(f"cannot stack these weights: {problem}")
    kind = type(weights[0])
    parts = {name: torch.cat([getattr(w, name).detach() for w in weights], dim=dim)
             for name, dim in ROW_DIMS[kind.__name__].items() if getattr(weights[0], name, None) is not None}
    attributes = _attributes(weights[0])
    if "shape" in kind.tensor_attribute_names:
        attributes["shape"] = torch.Size([sum(w.shape[0] for w in weights), weights[0].shape[1]])
    return kind(**parts, **attributes)
