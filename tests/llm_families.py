"""Tiny stand-ins for the LLMs the presets name, from their published files in tests/data/llms.

A family tokenizer has the published chat template and added tokens (strings, order, special flags, bos/eos/pad)
on a 256-token byte-level vocabulary without merges, so it encodes any text and concatenation-invariantly; a
tiny model is the published config.json with its sizes shrunk (same architecture class, rope scaling, biases).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from tests.reference import LLMS

NAMES = ("Qwen2.5-7B-Instruct", "Qwen2.5-14B-Instruct", "Qwen3-8B", "Llama-3.1-8B-Instruct")
# One per template family / architecture class (the two Qwen2.5 sizes share both).
FAMILIES = ("Qwen2.5-7B-Instruct", "Qwen3-8B", "Llama-3.1-8B-Instruct")
TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_window_layers=2)


def published_tokenizer_config(name: str) -> dict:
    """tests/data/llms/<name>/tokenizer_config.json (reduced: added tokens, bos/eos/pad, chat_template)."""
    return json.loads((LLMS / name / "tokenizer_config.json").read_text())


def _with_added_tokens(backend: Tokenizer, name: str) -> PreTrainedTokenizerFast:
    """`backend` plus the family's added tokens, appended in their published order, and its chat template."""
    config = published_tokenizer_config(name)
    for _, token in sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0])):
        added = AddedToken(token["content"], special=token["special"], normalized=False)
        (backend.add_special_tokens if token["special"] else backend.add_tokens)([added])
    specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=config["chat_template"],
                                   clean_up_tokenization_spaces=False, **specials)


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the family's added tokens at ids 256, 257, ... and its chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _with_added_tokens(backend, name)


def published_ids_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A tokenizer whose added tokens have their published ids (filler words below them), for id-level checks."""
    first = min(int(i) for i in published_tokenizer_config(name)["added_tokens_decoder"])
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(first)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _with_added_tokens(backend, name)


def published_config(name: str) -> PretrainedConfig:
    """The published config.json as a transformers config."""
    return AutoConfig.from_pretrained(LLMS / name)


def tiny_config(name: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The published config with tiny sizes and the tiny vocabulary's bos/eos ids."""
    values = json.loads((LLMS / name / "config.json").read_text())
    values.update(TINY_SIZES, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def write_llm_dir(name: str, directory: Path, seed: int = 0) -> PreTrainedTokenizerFast:
    """A loadable LLM directory of the family: tiny random fp32 weights, its tokenizer and chat template."""
    tokenizer = family_tokenizer(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tokenizer), tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer
