"""Fast decoding of one conversation: a static KV cache, with image encoder, prefill and decode step each
replayed from a CUDA graph.

transformers' `generate` spends more time in Python per token than a batch-1 decode step takes on a GPU, and an
eager forward of a 7B model at batch 1 is bound by kernel launches, not by the GPU. Here:
- the image encoder (ViT + Q-Former + projection) is one graph per image-batch shape;
- the prompt is right-padded to a length bucket (`prefill_bucket`) and prefilled by one graph per bucket; the
  cache length is then rewound to the real prompt length, so the padding's keys and values are masked out and
  overwritten by the tokens that follow;
- each decode step is one graph that chooses the next token (`TokenChooser`: greedy, or sampled with
  temperature / top-k / top-p, and a repetition penalty), feeds it back, advances the position and records it,
  so the host only replays graphs and looks at the tokens every `check_every` steps.
Without CUDA graphs (on the CPU, or `cuda_graphs=False`) the very same step functions run eagerly: the tests
check that path against `MiniGPT4Qwen.generate`, and that the step functions never synchronise with the host.
One prompt at a time; beam search and batches go through `MiniGPT4Qwen.generate`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from minigpt4qwen.inference.decoding.cuda_graphs import maybe_captured
from minigpt4qwen.inference.decoding.token_choice import TokenChooser
from minigpt4qwen.model.compilation import compile_decode_step
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

SMALL_BUCKET = 64  # prompts up to SMALL_BUCKETS_UP_TO tokens pad to a multiple of this
SMALL_BUCKETS_UP_TO = 512


def prefill_bucket(length: int, limit: int) -> int:
    """The padded prefill length of a `length`-token prompt: a multiple of 64 up to 512, then the next of
    768, 1024, 1536, 2048, 3072, ... (at most 50% padding, few graphs); never above `limit`."""
    if length <= SMALL_BUCKETS_UP_TO:
        bucket = -(-length // SMALL_BUCKET) * SMALL_BUCKET
    else:
        bucket = SMALL_BUCKETS_UP_TO
        while bucket < length:
            bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, limit)


class GraphDecoder:
    """Greedy or sampled decoding of single prompts with a reusable static cache and CUDA graphs. Thread-safe
    (one call at a time); share one per model between chat sessions.

    Args:
        model: the model; its LLM must use transformers' full-attention `StaticLayer` caches (every native
            decoder without sliding-window layers, e.g. Qwen2, Llama).
        max_cache_len: prompt + new tokens the cache holds at first.
        grow: reallocate a larger cache (and re-capture the graphs) when a request needs more; else refuse it.
        cuda_graphs: replay the steps from CUDA graphs (default: when the LLM is on a GPU).
        compile_mode: `torch.compile` the decode step's forward in this inductor mode first ("default", or
            "max-autotune-no-cudagraphs" to also tune the matmuls), for fused kernels; None runs eager kernels.
            Compiling takes one to a few minutes on first use.
        check_every: decode steps between looks at the tokens (stop tokens, streaming, cancellation).
        rehearse_captures: without CUDA graphs, still run each step once where it would be captured (tests).

    Raises:
        ValueError: the LLM's cache has sliding-window layers (right-padded prefill would evict real tokens).
    """

    def __init__(self, model: MiniGPT4Qwen, *, max_cache_len: int = 1024, grow: bool = True,
                 cuda_graphs: bool | None = None, compile_mode: str | None = None, check_every: int = 8,
                 rehearse_captures: bool = False):
        self.model = model
        self.llm = model.language_model
        self.device = self.llm.get_input_embeddings().weight.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.grow, self.check_every, self.rehearse = grow, check_every, rehearse_captures
        # transformers renamed `past_key_values` to `cache` (5.2x); pass the cache under the name this version takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values"
        self._decode_forward = self._decode_logits if compile_mode is None else \
            compile_decode_step(self._decode_logits, model, mode=compile_mode, dynamic=False)
        self.chooser = TokenChooser(self.llm.get_output_embeddings().out_features, self.device)
        self._encoders: dict[tuple[int, ...], tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}
        self.lock = threading.Lock()
        self._allocate(max_cache_len)

    # ----------------------------------------------------------------------------------------- buffers
    def _allocate(self, capacity: int) -> None:
        """(Re)allocates the cache and every static buffer for `capacity` tokens and captures the greedy decode
        step (the sampling one when first used)."""
        self._prefills: dict[tuple[int, bool], Callable[[], None]] = {}
        self._decodes: dict[bool, Callable[[], None]] = {}
        self.cache = StaticCache(config=self.llm.config, max_cache_len=capacity)
        if not all(type(layer) is StaticLayer for layer in self.cache.layers):
            raise ValueError("GraphDecoder needs full-attention static cache layers; this LLM has "
                             f"{sorted({type(layer).__name__ for layer in self.cache.layers})}")
        self.max_cache_len = capacity
        dev, hidden = self.device, self.llm.get_input_embeddings().weight
        self.embeds = torch.zeros(1, capacity, hidden.shape[1], dtype=hidden.dtype, device=dev)
        self.positions = torch.arange(capacity, device=dev)[None]  # [1, capacity]
        self.prompt_length = torch.zeros((), dtype=torch.long, device=dev)
        self.last_index = torch.zeros(1, dtype=torch.long, device=dev)  # prompt_length - 1, as an index
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # the last token, fed to the next step
        self.position = torch.zeros(1, 1, dtype=torch.long, device=dev)  # its position
        self.generated = torch.zeros(1, capacity + 2, dtype=torch.long, device=dev)  # token at each position
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._decode_call(sample=False)

    def _decode_call(self, sample: bool) -> Callable[[], None]:
        """The decode step (captured on first use)."""
        if sample not in self._decodes:
            # Warm-up steps run from position 0, where the next prefill overwrites whatever they write.
            self._rewind(torch.zeros_like(self.prompt_length))
            self.position.zero_()
            step = functools.partial(self._decode_step, sample)
            self._decodes[sample] = maybe_captured(step, self.cuda_graphs, self._pool, self.rehearse)
        return self._decodes[sample]

    def _prefill_call(self, bucket: int, sample: bool) -> Callable[[], None]:
        """The prefill of a `bucket`-token padded prompt (captured on first use)."""
        if (bucket, sample) not in self._prefills:
            step = functools.partial(self._prefill_step, bucket, sample)
            self._prefills[bucket, sample] = maybe_captured(step, self.cuda_graphs, self._pool, self.rehearse)
        return self._prefills[bucket, sample]

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.max_cache_len:
            return
        if not self.grow:
            raise ValueError(f"prompt + max_new_tokens ({needed}) exceed max_cache_len {self.max_cache_len}")
        self._allocate(max(needed, 2 * self.max_cache_len))

    def _rewind(self, length: torch.Tensor) -> None:
        """Sets every layer's cache length (where the next keys and values are written) to `length`."""
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(length)

    # ------------------------------------------------------------------- step functions (captured as graphs)
    def _record(self, token: torch.Tensor, position: torch.Tensor) -> None:
        """Makes `token` [1, 1] at `position` [1, 1] the next step's input and records it."""
        self.token.copy_(token)
        self.position.copy_(position)
        self.generated.index_copy_(1, position[0], token)

    def _prefill_step(self, bucket: int, sample: bool) -> None:
        """Prefills `embeds[:, :bucket]` from an empty cache; emits the first new token."""
        self._rewind(torch.zeros_like(self.prompt_length))
        self.chooser.reset()
        logits = self.llm(inputs_embeds=self.embeds[:, :bucket], position_ids=self.positions[:, :bucket],
                          use_cache=True, logits_to_keep=self.last_index, **{self._cache_kw: self.cache}).logits
        self._rewind(self.prompt_length)  # the padding's keys/values sit beyond: masked, then overwritten
        self._record(self.chooser(logits[:, -1], sample), self.prompt_length.view(1, 1))

    def _decode_logits(self) -> torch.Tensor:
        """The next-token logits [1, V] after `token` at `position` (its keys and values join the cache)."""
        return self.llm(input_ids=self.token, position_ids=self.position, use_cache=True,
                        **{self._cache_kw: self.cache}).logits[:, -1]

    def _decode_step(self, sample: bool) -> None:
        """One token: reads `token` at `position`, emits the chosen one at `position + 1`."""
        self._record(self.chooser(self._decode_forward(), sample), self.position + 1)

    # --------------------------------------------------------------------------------------------- API
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`MiniGPT4Qwen.encode_images`, replayed from a graph per input shape on the GPU. [N, 3, S, S] -> [N, Q, H]."""
        if not self.cuda_graphs:
            return self.model.encode_images(pixel_values)
        with self.lock:
            shape = tuple(pixel_values.shape)
            if shape not in self._encoders:
                buffer = torch.zeros(shape, dtype=self.model.part_dtype("vision_model"), device=pixel_values.device)
                call = maybe_captured(lambda: self.model.encode_images(buffer), True, self._pool)
                self._encoders[shape] = (buffer, call)
            buffer, call = self._encoders[shape]
            buffer.copy_(pixel_values)
            return call().clone()  # the graph's output is overwritten by its next replay

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                 image_features: torch.Tensor | None = None, max_new_tokens: int = 512,
                 stop_token_ids: Sequence[int] = (), on_tokens: Callable[[list[int]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """Continuation of one unpadded prompt [1, T]; returns the new tokens [1, n] (stop token included).

        Args:
            input_ids: the prompt with its image placeholders.
            pixel_values / image_features: the prompt's images, as pixels or as `encode_images` output.
            max_new_tokens: the most tokens to generate.
            stop_token_ids: tokens that end the reply (included in it).
            on_tokens: receives the new tokens as they are read back: the first one alone, then in chunks of
                up to `check_every`.
            should_stop: polled between chunks; True ends the generation there (e.g. a user's cancel).
            do_sample, temperature, top_p, top_k, repetition_penalty: as in transformers' `generate` (see
                `TokenChooser`); greedy by default.
            seed: seeds torch right before the first token (after any graph capture), so a seed gives the same
                reply every time.

        Raises:
            ValueError: a batch of several prompts, `max_new_tokens` < 1, or (with `grow=False`) a request
                beyond `max_cache_len`.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("GraphDecoder takes one prompt at a time; use MiniGPT4Qwen.generate for batches")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
        length = input_ids.shape[1]
        with self.lock:
            self._ensure_capacity(length + max_new_tokens)
            # The prompt first: a graph captured now warms up on it (an index from a longer prompt would be
            # out of this bucket's range).
            self.embeds[:, :length].copy_(self.model.embed(input_ids.to(self.device), image_features))
            self.prompt_length.fill_(length)
            self.last_index.fill_(length - 1)
            prefill = self._prefill_call(prefill_bucket(length, self.max_cache_len), do_sample)
            decode = self._decode_call(do_sample)
            self.chooser.configure(temperature=temperature, top_p=top_p, top_k=top_k,
                                   repetition_penalty=repetition_penalty)
            if seed is not None:
                torch.manual_seed(seed)
            prefill()
            tokens = self._read_back(decode, length, max_new_tokens, set(stop_token_ids), on_tokens, should_stop)
        return torch.tensor([tokens], dtype=torch.long, device=input_ids.device)

    def _read_back(self, decode: Callable[[], None], length: int, max_new_tokens: int, stops: set[int],
                   on_tokens: Callable[[list[int]], None] | None, should_stop: Callable[[], bool] | None) -> list[int]:
        """Runs decode steps in chunks after the prefill, reading each chunk back; returns the new tokens."""
        tokens: list[int] = []
        produced = 1  # the prefill's token
        while True:
            chunk = self.generated[0, length + len(tokens) : length + produced].tolist()
            stop_at = next((i for i, token in enumerate(chunk) if token in stops), None)
            if stop_at is not None:
                chunk = chunk[: stop_at + 1]
            tokens += chunk
            if on_tokens is not None:
                on_tokens(chunk)
            if stop_at is not None or produced == max_new_tokens or (should_stop is not None and should_stop()):
                return tokens
            for _ in range(min(self.check_every, max_new_tokens - produced)):
                decode()
                produced += 1
