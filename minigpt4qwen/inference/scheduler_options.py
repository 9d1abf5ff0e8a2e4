"""The continuous-batching scheduler behind serve, webui, generate and eval, from the command line: its options, the
KV cache's size per slot (what fits the GPU after loading), and the scheduler built and warmed up from them.
Heavy imports happen inside the functions, so registering the options keeps `minigpt4qwen --help` instant.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
    from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

MAX_AUTO_SLOT_TOKENS = 2048  # the scheduler's default tokens per slot, where memory allows
KV_CACHE_SHARE = 0.8  # of the GPU memory free after loading, for the scheduler's KV cache (the rest: activations)


def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options of the continuous-batching scheduler (`build_scheduler`) behind serve, webui, generate, eval.

    Not on a parser that has `add_decoder_options`: both define --no-cuda-graphs.

    Args:
        parser: a subcommand's parser.
    """
    g = parser.add_argument_group("batching (the KV cache holds slots x slot-tokens tokens: 0.5 MiB each at 7B bf16)")
    g.add_argument("--slots", type=int, default=32, help="requests decoded together; more wait for a free slot")
    g.add_argument("--slot-tokens", type=int, default=None,
                   help="tokens per slot (prompt + reply): a longer prompt fails (serve: 400; generate, eval: that "
                        f"record is skipped and reported), replies stop there; default: up to {MAX_AUTO_SLOT_TOKENS}, "
                        f"as many as fit {KV_CACHE_SHARE:.0%}% of the GPU memory free after loading")  # %%: argparse
    g.add_argument("--no-cuda-graphs", action="store_true", help="run the decode steps eagerly (debugging)")
    g.add_argument("--compile-decode", action="store_true",
                   help="also compile the decode step: fused kernels, faster decoding, after a minute or two of "
                        "compiling at start (every decode step is prepared before the first request)")


def build_scheduler(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase,
                    args: argparse.Namespace) -> GenerationScheduler:
    """The generation scheduler of `model` as the options of `add_scheduler_options` ask; its thread runs until
    `close()`, which the caller owes.

    Raises:
        ValueError: --slots below 1 or --slot-tokens below 2, or a model the scheduler cannot decode.
    """
    from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler

    slot_tokens = args.slot_tokens if args.slot_tokens is not None else auto_slot_tokens(model, args.slots)
    if args.slots < 1 or slot_tokens < 2:
        raise ValueError(f"--slots must be >= 1 and --slot-tokens >= 2 (a prompt token and a reply token), got "
                         f"{args.slots} and {slot_tokens}")
    logging.getLogger(__name__).info("generation scheduler: %d slots of %d tokens", args.slots, slot_tokens)
    scheduler = GenerationScheduler(model, tokenizer, slots=args.slots, capacity=slot_tokens,
                                    cuda_graphs=False if args.no_cuda_graphs else None,
                                    compile_mode="default" if args.compile_decode else None)
    scheduler.warm_up(show_progress=True)  # before any request, so that none waits for a capture or a compile
    return scheduler


def auto_slot_tokens(model: MiniGPT4Qwen, slots: int) -> int:
    """Tokens per slot when none are asked for: `MAX_AUTO_SLOT_TOKENS` on the CPU; on a GPU what
    `slot_tokens_that_fit` gives for the memory free after loading, so the default fits the card it runs on."""
    import torch

    # The embedding's dtype is the keys' and values' (a quantized LLM keeps its embedding in bf16).
    embedding = model.language_model.get_input_embeddings().weight
    if embedding.device.type != "cuda":
        return MAX_AUTO_SLOT_TOKENS
    free, _ = torch.cuda.mem_get_info(embedding.device)
    return slot_tokens_that_fit(free, slots, model.language_model.config, embedding.element_size())


def slot_tokens_that_fit(free_bytes: int, slots: int, llm_config: Any, element_size: int) -> int:
    """The most tokens per slot (a multiple of 64, at most `MAX_AUTO_SLOT_TOKENS`) for which the keys and values
    of `slots` slots fill at most `KV_CACHE_SHARE` of `free_bytes` (Qwen-7B in bf16, 0.5 MiB a token, with
    5 GiB free as on a 24 GB card: 32 slots of 256 tokens).

    Raises:
        ValueError: not even 64 tokens per slot fit (fewer --slots, or an explicit --slot-tokens, may).
    """
    heads = getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    bytes_per_token = 2 * llm_config.num_hidden_layers * heads * head_dim * element_size  # keys + values
    fitting = int(free_bytes * KV_CACHE_SHARE) // (slots * bytes_per_token) // 64 * 64
    if fitting < 64:
        raise ValueError(f"{slots} slots leave fewer than 64 tokens each in the {free_bytes / 2**30:.1f} GiB free: "
                         "pass fewer --slots (or an explicit --slot-tokens)")
    return min(MAX_AUTO_SLOT_TOKENS, fitting)
