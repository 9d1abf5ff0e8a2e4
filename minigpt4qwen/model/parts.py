"""The five parts of the model and the per-part settings that apply to them: trainable flags and dtypes.

Names are the attribute (and state-dict prefix) names of `MiniGPT4Qwen`, identical to transformers'
`Blip2ForConditionalGeneration`, so a part name is also a checkpoint key prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PART_NAMES = ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (and the same for fp16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


@dataclass
class TrainableParts:
    """Which parts receive gradients. The original recipe trains only the projection.

    A frozen part has `requires_grad=False` and is kept in eval mode (no dropout) even when the model is put in
    train mode; gradients still flow *through* a frozen LLM to the projection.
    """

    vision_model: bool = False
    qformer: bool = False
    query_tokens: bool = False
    language_projection: bool = True
    language_model: bool = False

    @classmethod
    def all(cls) -> "TrainableParts":
        """Every part trainable (training from scratch, e.g. the CPU demo)."""
        return cls(True, True, True, True, True)

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class PartDtypes:
    """Storage dtype of each part. Frozen towers in half precision save memory; trained parts stay fp32 so
    the optimizer updates are exact (autocast handles the mixed matmuls)."""

    vision_model: str = "fp32"
    qformer: str = "fp32"
    query_tokens: str = "fp32"
    language_projection: str = "fp32"
    language_model: str = "fp32"

    @classmethod
    def uniform(cls, dtype: str) -> "PartDtypes":
        """The same dtype for every part."""
        return cls(dtype, dtype, dtype, dtype, dtype)

    def as_dict(self) -> dict[str, torch.dtype]:
        return {f.name: parse_dtype(getattr(self, f.name)) for f in fields(self)}
