"""The language model and its tokenizer from a local directory, whatever its family, without remote code.

A Qwen1 directory (Qwen-7B/14B-Chat, `model_type: qwen`) is converted on the fly to `Qwen2ForCausalLM`
(`qwen1.py`); any other directory must be a `transformers`-native causal LM (Qwen2, Qwen2.5, Qwen3, ...).
Usage: `model, tokenizer = load_llm("/models/Qwen-7B-Chat"); image_id = placeholder_token_id(tokenizer)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.qwen1 import (
    checkpoint_shards,
    is_qwen1_dir,
    load_qwen1_dir,
    qwen2_config_from_qwen1,
    read_config_json,
)
from minigpt4qwen.text.qwen_tokenizer import load_tokenizer

# Existing tokens reserved for image features, by family: Qwen1 `<|extra_0|>` (what MiniGPT4Qwen used), then
# Qwen2.5 / Qwen3 / Qwen2-VL `<|image_pad|>` (id 151655, an embedding row these text models never trained).
PLACEHOLDER_CANDIDATES = ("<|extra_0|>", "<|image_pad|>")
# Added when no candidate exists (e.g. the original Qwen2, whose only specials are endoftext/im_start/im_end).
NEW_PLACEHOLDER = "<image>"


def llm_config_from_dir(path: str | Path) -> PretrainedConfig:
    """The LLM's `transformers` config, without loading weights (e.g. to build the model on meta).

    Args:
        path: a local model directory.

    Returns:
        For Qwen1 the converted `Qwen2Config`, otherwise `AutoConfig` read locally with no remote code.

    Raises:
        FileNotFoundError: `path` is not a directory or has no config.json.
        ValueError: the config needs remote code or is not a model type this `transformers` knows.
    """
    raw = read_config_json(path)
    if raw.get("model_type") == "qwen":
        return qwen2_config_from_qwen1(raw)
    return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_llm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer from a local directory; remote code is never run.

    Args:
        path: a Qwen1 directory (converted to `Qwen2ForCausalLM`) or a `transformers`-native one.
        dtype: parameter dtype.
        device: where the parameters go.
        attn_implementation: `"sdpa"`, `"eager"` or `"flash_attention_2"`.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        FileNotFoundError: no such directory, no config.json, or no weight files.
        ValueError: a model type that needs remote code, or a Qwen1 config Qwen2 cannot express.
        CheckpointError: (Qwen1) weights that do not match the config.
    """
    if is_qwen1_dir(path):
        model = load_qwen1_dir(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return model, load_tokenizer(path)
    read_config_json(path)  # a clear error for a missing directory / config.json before transformers' own
    checkpoint_shards(path)  # and for a directory without weights
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        device_map={"": torch.device(device)},
        local_files_only=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
    )
    return model.eval(), load_tokenizer(path)


def placeholder_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the token whose embedding rows are replaced by image features.

    Uses a token the family already reserves (`<|extra_0|>` for Qwen1, `<|image_pad|>` for Qwen2.5 / Qwen3).
    Otherwise `<image>` is added to this tokenizer as a special token: if its id is not below the model's
    embedding rows, call `model.resize_token_embeddings(len(tokenizer))` (not needed for Qwen2, whose new id
    151646 is below its 151936 rows).

    Args:
        tokenizer: the LLM's tokenizer; it may be modified (see above).

    Returns:
        The placeholder token id.
    """
    vocab = tokenizer.get_vocab()
    for token in (*PLACEHOLDER_CANDIDATES, NEW_PLACEHOLDER):
        if token in vocab:
            return vocab[token]
    # special + not normalized: always one atomic token, never split or changed by the normalizer.
    tokenizer.add_tokens([AddedToken(NEW_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(NEW_PLACEHOLDER)
