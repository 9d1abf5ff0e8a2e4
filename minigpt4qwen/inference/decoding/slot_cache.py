"""A KV cache of fixed slots, one per request in flight, each row at its own length.

transformers' `StaticCache` keeps one write position for the whole batch, so its rows must advance together;
continuous batching needs each request to write its keys and values at its own positions. `SlotCache` holds, per
layer, keys and values of shape [slots, kv_heads, capacity + 1, head_dim]. Before each forward the caller plans
it (`plan`): which slot each batch row is, at which column each new token is written (padding tokens and idle
rows write to the extra last column, which no query ever sees), and how many columns (`span`) attention reads.
Attention is masked per row by `visibility_mask` (a query sees the columns up to its own position), passed to the
model as a prepared 4D mask, which transformers uses as given. Every tensor keeps its address, and the plan
is made of tensors computed on the device, so forwards over this cache can be captured as CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class _Plan:
    """Where the next forward writes and what it reads (shared by every layer)."""

    rows: torch.Tensor | None = None  # [R] slot of each batch row; None: rows 0..R-1 are slots 0..R-1
    columns: torch.Tensor | None = None  # [R, C] column of each new token
    span: int = 0  # columns read by attention


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slots (allocated up front, so no lazy initialisation)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, plan: _Plan, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.plan, self.keys, self.values = plan, keys, values
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the slots exist from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes [R, H, C, D] new keys/values at the planned slots and columns; returns the rows' first `span`
        columns ([R, H, span, D])."""
        plan, count = self.plan, key_states.shape[0]
        columns = plan.columns.to(self.device)  # no-op unless the LLM is spread over several devices
        rows = torch.arange(count, device=self.device) if plan.rows is None else plan.rows.to(self.device)
        where = (rows[:, None].expand_as(columns), slice(None), columns)
        self.keys[where] = key_states.transpose(1, 2)
        self.values[where] = value_states.transpose(1, 2)
        if plan.rows is None:  # a prefix of the slots: a view, no copy
            return self.keys[:count, :, : plan.span], self.values[:count, :, : plan.span]
        return self.keys[:, :, : plan.span].index_select(0, rows), self.values[:, :, : plan.span].index_select(0, rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.span, 0

    def get_seq_length(self) -> int:
        return self.plan.span

    def get_max_length(self) -> int:
        return self.keys.shape[2] - 1


class SlotCache(Cache):
    """`slots` rows of `capacity` tokens for every layer of an LLM with full attention.

    Args:
        config: the LLM's config.
        slots: rows (requests in flight at once).
        capacity: tokens per row (prompt + reply).
        dtype: of the keys and values (the LLM's).
        devices: each layer's device (the LLM's layers may be spread over several GPUs).

    Raises:
        ValueError: the LLM has sliding-window or other non-full-attention layers.
    """

    def __init__(self, config: PretrainedConfig, slots: int, capacity: int, dtype: torch.dtype,
                 devices: Sequence[torch.device]):
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"the slot cache needs full-attention layers only; this LLM has {sorted(kinds)}")
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, heads, capacity + 1, head_dim)  # + the trash column
        self.plan = _Plan()
        self.slots, self.capacity = slots, capacity
        super().__init__(layers=[
            SlotLayer(self.plan, torch.zeros(shape, dtype=dtype, device=device),
                      torch.zeros(shape, dtype=dtype, device=device))
            for device in devices])

    @property
    def trash(self) -> int:
        """The column that padding and idle rows write to; never visible."""
        return self.capacity

    def plan_forward(self, columns: torch.Tensor, span: int, rows: torch.Tensor | None = None) -> None:
        """Sets where the next forward writes (`columns` [R, C], `rows` [R] or None for slots 0..R-1) and how
        many columns it reads (`span` <= capacity)."""
        self.plan.rows, self.plan.columns, self.plan.span = rows, columns, span

    def move(self, source: int, target: int, length: int) -> None:
        """Copies the first `length` columns of slot `source` to slot `target` (eagerly, between forwards)."""
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]

    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)


def visibility_mask(query_positions: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of queries at `query_positions` [R, C] over `span` columns: [R, 1, C, span],
    0 where column <= the query's position, the dtype's minimum elsewhere (as transformers' own masks)."""
    columns = torch.arange(span, device=query_positions.device)
    visible = columns[None, None, :] <= query_positions[:, :, None]
    zero = torch.zeros((), dtype=dtype, device=query_positions.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None]
