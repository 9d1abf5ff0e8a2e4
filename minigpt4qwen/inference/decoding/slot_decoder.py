"""The device side of the generation scheduler: batched prefill and decode steps over a `SlotCache`, replayed
from CUDA graphs on a GPU.

Requests live in slots; the scheduler keeps the slots in use packed at the front (0..n-1), so a decode step
runs over the first `bucket` slots (1, 2, 4, ..., 64), each row at its own position, and reads the first `span`
cache columns (a power of two covering the longest row). One graph per (bucket, span, sampling) is captured on
first use. Rows that are not decoding (free, or still prefilling) run along but write to the cache's trash
column and keep their state. A prefill forward takes one chunk of prompt embeddings for each of several slots
(padded to a row bucket and a length bucket); small ones are graphs too (launch-bound), large ones run eagerly.
Images of several requests are encoded in one batch (padded to a power of two, one graph per size).
Nothing is waited for while work is queued: prefills and chunks of decode steps return a `Readback` of their
tokens, copied to pinned host memory behind them, so the caller can queue the next chunk before reading this one.
Host values reach the device as fills or through pinned memory: `tensor[i] = 3` on a CUDA tensor copies from
pageable memory and waits for every queued step (tests/test_scheduler.py checks with torch's sync debug mode).
Without CUDA graphs (on the CPU) the same step functions run eagerly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minigpt4qwen.inference.decoding.cuda_graphs import maybe_captured
from minigpt4qwen.inference.decoding.graph_decoder import prefill_bucket
from minigpt4qwen.inference.decoding.readback import DeviceMark, Readback
from minigpt4qwen.inference.decoding.slot_cache import SlotCache, visibility_mask
from minigpt4qwen.inference.decoding.token_choice import RowChooser
from minigpt4qwen.model.compilation import compile_decode_step
from minigpt4qwen.model.device_copy import to_device_queued
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

MIN_SPAN = 64
# Steps of a chunk still queued when the host is told to queue the next round's work: enough to cover the host's
# round (admissions, prefill and decode launches, a few ms) so the device never idles, few enough that a newcomer's
# prefill waits behind these steps only, not behind a whole chunk queued ahead.
LEAD_STEPS = 2


def padded_length(length: int) -> int:
    """The padded length of a prefill chunk of `length` tokens (`prefill_bucket`: few shapes, little padding)."""
    return prefill_bucket(length, 1 << 62)


def power_of_two(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return max(least, 1 << max(n - 1, 0).bit_length())


@dataclass
class Chunk:
    """A piece of one slot's prompt to prefill: `embeds` [c, H] at positions start..start+c-1; `final` when it
    ends the prompt (the forward then chooses the slot's first token)."""

    slot: int
    embeds: torch.Tensor
    start: int
    final: bool


class SlotDecoder:
    """Batched decoding over `slots` slots of `capacity` tokens.

    Args:
        model: the model; its LLM must have full-attention layers and an sdpa or eager attention.
        slots: requests decoded at once (the largest decode bucket).
        capacity: tokens per slot (prompt + reply).
        cuda_graphs: replay steps from CUDA graphs (default: when the whole LLM is on one GPU; an LLM spread over
            several devices runs eagerly, its cache layers on their layers' devices).
        check_every: the most decode steps between two read-backs (the size of the token ring).
        prefill_tokens: the most padded tokens (rows x length) of one prefill forward.
        graph_prefill_tokens: prefill forwards up to this many padded tokens are CUDA graphs.
        compile_mode: `torch.compile` the decode step's forward in this inductor mode ("default"; see
            `GraphDecoder`) for fused kernels, before its graphs are captured; None runs eager kernels.
        rehearse_captures: without CUDA graphs, still run each step once where it would be captured (tests).
    """

    def __init__(self, model: MiniGPT4Qwen, *, slots: int = 64, capacity: int = 1024, cuda_graphs: bool | None = None,
                 check_every: int = 8, prefill_tokens: int = 2048, graph_prefill_tokens: int = 512,
                 compile_mode: str | None = None, rehearse_captures: bool = False):
        self.model, self.llm = model, model.language_model
        attention = getattr(self.llm.config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"the slot decoder masks attention per row, which needs the 'sdpa' or 'eager' attention "
                             f"implementation; this LLM uses {attention!r} (load it with attn_implementation='sdpa')")
        self.decoder, self.lm_head = self.llm.get_decoder(), self.llm.get_output_embeddings()
        embedding = self.llm.get_input_embeddings().weight
        self.device, self.dtype = embedding.device, embedding.dtype
        layers = getattr(self.decoder, "layers", None)
        devices = ([next(layer.parameters()).device for layer in layers] if layers is not None
                   else [self.device] * self.llm.config.num_hidden_layers)
        one_gpu = self.device.type == "cuda" and set(devices) == {self.device}
        self.cuda_graphs = one_gpu if cuda_graphs is None else cuda_graphs
        self.slots, self.capacity, self.check_every = slots, capacity, check_every
        self.prefill_tokens, self.graph_prefill_tokens = prefill_tokens, graph_prefill_tokens
        self.rehearse = rehearse_captures
        self._cache_kw = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        # Batch rows and span are symbolic: one compile serves every bucket but 1 (torch specialises sizes of 1; a
        # CUDA int4 model compiles once more where the batch reaches int4_many_rows.DEQUANT_MIN_ROWS).
        self._decode_forward = self._decode_logits if compile_mode is None else \
            compile_decode_step(self._decode_logits, model, mode=compile_mode, dynamic=True)
        self.cache = SlotCache(self.llm.config, slots + 1, capacity, self.dtype, devices)  # + a scratch slot
        self.scratch = slots
        rows, dev = slots + 1, self.device
        self.chooser = RowChooser(rows, self.lm_head.out_features, dev)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # each slot's last token, the next input
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # its position
        self.live = torch.zeros(rows, dtype=torch.bool, device=dev)  # decoding (not free, not prefilling)
        self.ring = torch.zeros(rows, check_every, dtype=torch.long, device=dev)  # tokens of the last steps
        self.ring_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.slot_ids = torch.arange(rows, device=dev)
        most_rows = power_of_two(slots)
        buffer_tokens = max(prefill_tokens, padded_length(capacity))  # any one chunk fits
        self.chunk_embeds = torch.zeros(buffer_tokens, embedding.shape[1], dtype=self.dtype, device=dev)
        self.chunk_slot = torch.full((most_rows,), self.scratch, dtype=torch.long, device=dev)
        self.chunk_start = torch.zeros(most_rows, 1, dtype=torch.long, device=dev)
        self.chunk_length = torch.zeros(most_rows, 1, dtype=torch.long, device=dev)
        self.chunk_final = torch.zeros(most_rows, dtype=torch.bool, device=dev)
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._graphs: dict[tuple, Callable[[], None]] = {}
        self._encoders: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}

    # ------------------------------------------------------------------- step functions (captured as graphs)
    def _hidden(self, embeds: torch.Tensor | None, tokens: torch.Tensor | None, positions: torch.Tensor,
                span: int) -> torch.Tensor:
        """Hidden states [R, C, H] of a forward over the planned cache rows (a 4D mask is used as given)."""
        mask = visibility_mask(positions, span, self.dtype)
        return self.decoder(input_ids=tokens, inputs_embeds=embeds, position_ids=positions, use_cache=True,
                            attention_mask=mask, **{self._cache_kw: self.cache}).last_hidden_state

    def _prefill_step(self, rows: int, length: int, span: int, sample: bool) -> None:
        """One chunk for each of `rows` slots (padding rows point at the scratch slot); chooses the first token of
        the slots whose prompt it completes."""
        slots, start, real = self.chunk_slot[:rows], self.chunk_start[:rows], self.chunk_length[:rows]
        offsets = torch.arange(length, device=self.device)[None]
        positions = start + offsets
        self.cache.plan_forward(torch.where(offsets < real, positions, self.cache.trash), span, rows=slots)
        hidden = self._hidden(self.chunk_embeds[: rows * length].view(rows, length, -1), None, positions, span)
        last = (real - 1).clamp(min=0)[:, :, None].expand(-1, -1, hidden.shape[-1]).to(hidden.device)
        logits = self.lm_head(hidden.gather(1, last))[:, 0].to(self.device)
        final = self.chunk_final[:rows]
        token = self.chooser(logits, slots, sample, final)
        self.token[slots] = torch.where(final[:, None], token, self.token[slots])
        self.position[slots] = torch.where(final[:, None], start + real, self.position[slots])
        self.live[slots] = self.live[slots] | final

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """Next-token logits [R, V] of `tokens` [R, 1] at `positions` [R, 1] over the planned cache rows."""
        return self.lm_head(self._hidden(None, tokens, positions, span)[:, -1]).to(self.device)

    def _decode_step(self, bucket: int, span: int, sample: bool) -> None:
        """One token for each decoding slot among the first `bucket`; recorded in the ring."""
        live, position = self.live[:bucket, None], self.position[:bucket]
        writable = live & (position < self.cache.capacity)
        self.cache.plan_forward(torch.where(writable, position, self.cache.trash), span)
        logits = self._decode_forward(self.token[:bucket], position, span)
        token = self.chooser(logits, self.slot_ids[:bucket], sample, live[:, 0])
        self.token[:bucket] = torch.where(live, token, self.token[:bucket])
        self.position[:bucket] = position + live.long()
        self.ring[:bucket].index_copy_(1, self.ring_index, token)
        self.ring_index.copy_((self.ring_index + 1) % self.check_every)

    def _graph(self, key: tuple, step: Callable[[], None], capture: bool = True) -> Callable[[], None]:
        """The step of `key`, captured on first use. A capture's warm-ups (and a rehearsal) really run the step:
        with no slot decoding and no prompt completed they write only to the trash column and to the cache
        columns the real run rewrites with the same values, and change no slot's state."""
        if key not in self._graphs:
            live, final = self.live.clone(), self.chunk_final.clone()
            self.live.zero_()
            self.chunk_final.zero_()
            try:
                self._graphs[key] = maybe_captured(step, self.cuda_graphs and capture, self._pool, self.rehearse)
            finally:  # a failed capture (out of memory) fails its requests only: the others keep decoding
                self.live.copy_(live)
                self.chunk_final.copy_(final)
        return self._graphs[key]

    # --------------------------------------------------------------------------------------------- API
    def span_for(self, longest: int) -> int:
        """The attention span for rows whose positions are below `longest`."""
        return min(self.capacity, power_of_two(longest, MIN_SPAN))

    @torch.no_grad()
    def warm_up(self, report: Callable[[int, int], None] | None = None) -> int:
        """Captures the decode step of every batch bucket, attention span and sampling mode now (compiling it first,
        with a `compile_mode`), so that no request later waits for a capture or a compile. Nothing to do without
        CUDA graphs (unless rehearsing). `report(done, total)` follows the progress. Returns the steps prepared."""
        if not (self.cuda_graphs or self.rehearse):
            return 0
        buckets = [1 << i for i in range(power_of_two(self.slots).bit_length())]
        spans = sorted({self.span_for(1 << i) for i in range(self.capacity.bit_length() + 1)})
        keys = [("decode", bucket, span, sample) for bucket in buckets for span in spans for sample in (False, True)]
        for done, key in enumerate(keys, 1):
            self._graph(key, functools.partial(self._decode_step, *key[1:]))
            if report is not None:
                report(done, len(keys))
        return len(keys)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`MiniGPT4Qwen.encode_images` of [N, 3, S, S], on a GPU padded to a power of two and replayed from a graph
        per size. -> [N, Q, H]."""
        if not self.cuda_graphs:
            return self.model.encode_images(pixel_values)
        count = pixel_values.shape[0]
        size = power_of_two(count)
        if size not in self._encoders:
            buffer = torch.zeros((size, *pixel_values.shape[1:]), dtype=self.model.part_dtype("vision_model"),
                                 device=self.device)
            self._encoders[size] = (buffer, maybe_captured(lambda: self.model.encode_images(buffer), True, self._pool))
        buffer, call = self._encoders[size]
        buffer[:count].copy_(pixel_values)
        buffer[count:].zero_()
        return call()[:count].clone()  # the graph's output is overwritten by its next replay

    def start(self, slot: int, *, sample: bool, seed: int, temperature: float, top_p: float, top_k: int,
              repetition_penalty: float) -> None:
        """Prepares `slot` for a new request (not decoding until its prompt is prefilled)."""
        self.live[slot].fill_(False)
        self.chooser.configure(slot, sample=sample, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty)

    def release(self, slot: int) -> None:
        """Stops decoding `slot` (it is free from the next step on)."""
        self.live[slot].fill_(False)

    def move(self, source: int, target: int, length: int) -> None:
        """Moves the request in slot `source` (its first `length` cache columns and its state) to slot `target`."""
        self.cache.move(source, target, length)
        self.chooser.move(source, target)
        for state in (self.token, self.position, self.live):
            state[target] = state[source]
        self.live[source].fill_(False)

    @torch.no_grad()
    def launch_prefill(self, chunks: Sequence[Chunk], sample: bool) -> Readback:
        """Queues one forward prefilling one chunk per slot; its readback gives one row per chunk: [its first token]
        for a final chunk, [-1] for the others.

        Raises:
            ValueError: more chunks than slots, a chunk beyond the slot's capacity, or more padded tokens than the
                prefill buffer holds.
        """
        if not 0 < len(chunks) <= self.slots:
            raise ValueError(f"a prefill takes 1 to {self.slots} chunks, got {len(chunks)}")
        longest = max(chunk.start + len(chunk.embeds) for chunk in chunks)
        if longest > self.capacity:
            raise ValueError(f"a prompt of {longest} tokens does not fit a slot of {self.capacity} tokens")
        rows = power_of_two(len(chunks))
        length = padded_length(max(len(chunk.embeds) for chunk in chunks))
        if rows * length > len(self.chunk_embeds):
            raise ValueError(f"{rows} rows of {length} padded tokens exceed the prefill buffer of "
                             f"{len(self.chunk_embeds)} tokens")
        self.chunk_slot.fill_(self.scratch)
        self.chunk_length.zero_()
        self.chunk_final.zero_()
        embeds = self.chunk_embeds[: rows * length].view(rows, length, -1)
        for row, chunk in enumerate(chunks):
            embeds[row, : len(chunk.embeds)] = chunk.embeds
        plan = torch.tensor([[c.slot, c.start, len(c.embeds), c.final] for c in chunks])
        plan = to_device_queued(plan, self.device)
        count = len(chunks)
        self.chunk_slot[:count].copy_(plan[:, 0])
        self.chunk_start[:count, 0].copy_(plan[:, 1])
        self.chunk_length[:count, 0].copy_(plan[:, 2])
        self.chunk_final[:count].copy_(plan[:, 3].bool())
        key = ("prefill", rows, length, self.span_for(longest), sample)
        step = functools.partial(self._prefill_step, *key[1:])
        self._graph(key, step, capture=rows * length <= self.graph_prefill_tokens)()
        return Readback(self.token[self.chunk_slot[:count]].where(self.chunk_final[:count, None], -1))

    @torch.no_grad()
    def launch_decode(self, steps: int, rows: int, longest: int, sample: bool) -> Readback:
        """Queues `steps` (<= check_every) decode steps over slots 0..rows-1, whose positions stay below `longest`;
        the readback gives each row's tokens of these steps (meaningless for rows that are not decoding), and its
        `nearly` mark the point `LEAD_STEPS` steps before their end.

        Nothing here waits for the device: the next chunk can be queued before this one's tokens are read, so the
        GPU never idles while the host hands tokens out."""
        if not 0 < steps <= self.check_every:
            raise ValueError(f"a chunk runs 1 to {self.check_every} decode steps, got {steps}")
        bucket = power_of_two(rows)
        key = ("decode", bucket, self.span_for(longest), sample)
        step = self._graph(key, functools.partial(self._decode_step, *key[1:]))
        self.ring_index.zero_()
        nearly = None
        for index in range(steps):
            if index == max(steps - LEAD_STEPS, 0):
                nearly = DeviceMark(self.device)
            step()
        return Readback(self.ring[:rows, :steps], nearly)
