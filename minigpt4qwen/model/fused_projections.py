"""Fused projections for decoding: one Linear for q, k and v, one for the MLP's gate and up, applied in place.

At batch 1 a decode step is bound by kernel launches and weight reads: every Linear is its own small GEMV. Fusing
q/k/v (with their biases) and gate/up leaves two GEMVs per layer instead of five before the output projections,
each reading one contiguous matrix. The fused modules reuse transformers' own pieces (the model file's
`apply_rotary_pos_emb` and eager attention, the attention interface, the cache's `update`) and the original
`o_proj`, `down_proj`, activation and (Qwen3) per-head q/k norms.

Inference only: the fused parameters have other names (`qkv_proj`, `gate_up_proj`), so a fused model is neither
trained nor saved; `inference/loading.py:load_for_inference` applies it. Supported: transformers' Qwen2, Llama and
Qwen3 attention and MLP modules, in bf16/fp32 or quantized by torchao (int8, int4: their rows are stacked exactly,
`model/quantized_rows.py`). Left unfused (and logged): projections wrapped (LoRA), quantized weights that cannot
be stacked, weights not loaded yet (meta), and attention written for transformers before its `cache` argument.
transformers records attention weights (`output_attentions`) only from its own attention classes: a fused model
returns none.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP

from minigpt4qwen.model.int4_many_rows import ManyRowInt4Linear
from minigpt4qwen.model.quantization import adapt_quantized_layers, is_quantized
from minigpt4qwen.model.quantized_rows import stack_rows, stacking_problem

ATTENTION_TYPES = (Qwen2Attention, LlamaAttention, Qwen3Attention)
MLP_TYPES = (Qwen2MLP, LlamaMLP, Qwen3MLP)

logger = logging.getLogger(__name__)


def unfusable_reason(linears: Sequence[nn.Module]) -> str | None:
    """Why `linears` cannot become one Linear, or None when they can."""
    weights = [linear.weight for linear in linears]
    # ManyRowInt4Linear computes an int4 weight's many-row calls another way; the fused layer is routed again.
    if any(type(linear) not in (nn.Linear, ManyRowInt4Linear) for linear in linears):
        return "projections are not plain nn.Linear (e.g. LoRA adapters)"
    quantized = [is_quantized(w) for w in weights]
    if any(quantized) and not all(quantized):
        return "some projections quantized by torchao, others not"
    if all(quantized) and (problem := stacking_problem(weights)):
        return problem
    if any(w.is_meta for w in weights):
        return "weights not loaded (meta)"
    if len({(w.device, w.dtype, w.shape[1]) for w in weights}) > 1:
        return "projections differ in device, dtype or input size"
    if len({linear.bias is None for linear in linears}) > 1:
        return "some projections have a bias, others not"
    return None


def fuse_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One frozen Linear whose output is the concatenation of `linears`' outputs (weights and biases copied once;
    the originals are freed when nothing else holds them)."""
    weights = [linear.weight.detach() for linear in linears]
    weight = stack_rows(weights) if is_quantized(weights[0]) else torch.cat(weights)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


class FusedAttention(nn.Module):
    """transformers' Qwen2/Llama/Qwen3 attention with q, k and v computed by one Linear (`qkv_proj`).

    Args:
        attention: the module replaced; its `o_proj` and (Qwen3) `q_norm` / `k_norm` are reused.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        # The attributes the attention interfaces and caches read from the module they are given.
        self.config, self.layer_idx, self.head_dim = attention.config, attention.layer_idx, attention.head_dim
        self.num_key_value_groups, self.scaling = attention.num_key_value_groups, attention.scaling
        self.attention_dropout, self.is_causal = attention.attention_dropout, attention.is_causal
        # Qwen2 and Qwen3 pass their (per-layer) sliding window to the attention function; Llama has none.
        self.interface_kwargs: dict[str, Any] = (
            {"sliding_window": attention.sliding_window} if hasattr(attention, "sliding_window") else {})
        self.split_sizes = [attention.q_proj.out_features, attention.k_proj.out_features,
                            attention.v_proj.out_features]
        self.qkv_proj = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj
        self.q_norm = attention.q_norm if hasattr(attention, "q_norm") else nn.Identity()  # Qwen3's per-head norms
        self.k_norm = attention.k_norm if hasattr(attention, "k_norm") else nn.Identity()
        # The functions the replaced module's forward calls (the same maths in each model file).
        model_file = sys.modules[type(attention).__module__]
        self.apply_rotary_pos_emb = model_file.apply_rotary_pos_emb
        self.eager_attention_forward = model_file.eager_attention_forward

    @staticmethod
    def unfusable_reason(attention: nn.Module) -> str | None:
        """Why `attention` cannot be fused, or None when it can."""
        if "cache" not in inspect.signature(type(attention).forward).parameters:
            return "attention of a transformers version before the `cache` argument"
        return unfusable_reason([attention.q_proj, attention.k_proj, attention.v_proj])

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As the replaced module's forward: (output [B, T, H], attention weights or None)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).split(self.split_sizes, dim=-1)
        query = self.q_norm(query.view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(key.view(hidden_shape)).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self.eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, **self.interface_kwargs, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class FusedMLP(nn.Module):
    """transformers' gated MLP, `down(act(gate(x)) * up(x))`, with gate and up computed by one Linear (`gate_up_proj`).

    Args:
        mlp: the module replaced; its `down_proj` and activation are reused.
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.intermediate_size = mlp.gate_proj.out_features
        self.gate_up_proj = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    @staticmethod
    def unfusable_reason(mlp: nn.Module) -> str | None:
        """Why `mlp` cannot be fused, or None when it can."""
        return unfusable_reason([mlp.gate_proj, mlp.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H]."""
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


FUSED_TYPES = (FusedAttention, FusedMLP)  # the modules `export_hf` refuses to write


def fuse_projections(language_model: nn.Module) -> int:
    """Replaces, in place, every supported attention and MLP module of a frozen LLM by its fused equivalent.

    Each fused weight is built and the module swapped one at a time, so memory grows by one layer's projections
    at most while it runs and not at all after. Modules already fused, of other classes, or unfusable (see the
    module docstring) stay as they are; calling it again changes nothing.

    Args:
        language_model: a transformers causal LM (or its decoder), for inference.

    Returns:
        The number of decoder layers with a module fused.

    Raises:
        ValueError: the LLM has trainable parameters (fused weights must not train: their names differ from the
            checkpoint's).
    """
    if trainable := [name for name, p in language_model.named_parameters() if p.requires_grad][:3]:
        raise ValueError(f"fuse_projections is for inference only, but the LLM has trainable parameters ({trainable}"
                         "...): freeze it first (language_model.requires_grad_(False)), and never train or save "
                         "a fused model")
    planned: list[tuple[nn.Module, str, type[FusedAttention] | type[FusedMLP]]] = []
    skipped: dict[str, list[str]] = {}
    for parent_name, parent in language_model.named_modules():
        for name, child in parent.named_children():
            fused_type = (FusedAttention if type(child) in ATTENTION_TYPES
                          else FusedMLP if type(child) in MLP_TYPES else None)
            if fused_type is None:
                continue
            if reason := fused_type.unfusable_reason(child):
                skipped.setdefault(reason, []).append(f"{parent_name}.{name}")
            else:
                planned.append((parent, name, fused_type))
    for parent, name, fused_type in planned:
        setattr(parent, name, fused_type(getattr(parent, name)))
    if planned and any(is_quantized(p) for p in language_model.parameters()):
        # The fused int4 layers' many-row calls, as their parts' were (layers already adapted are left alone).
        adapt_quantized_layers(language_model)
    for reason, names in skipped.items():
        logger.info("left %d modules unfused (%s), e.g. %s", len(names), reason, names[0])
    return len({id(parent) for parent, _, _ in planned})
