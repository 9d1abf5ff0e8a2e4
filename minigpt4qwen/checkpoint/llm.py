"""The language model and its tokenizer from a local directory, whatever its family, without remote code.

A Qwen1 directory (Qwen-7B/14B-Chat, `model_type: qwen`) is converted on the fly to `Qwen2ForCausalLM`
(`qwen1.py`); any other directory must be a `transformers`-native causal LM (Qwen2, Qwen2.5, Qwen3, ...).
Usage: `model, tokenizer = load_llm("/models/Qwen-7B-Chat"); image_id = prepare_placeholder(model, tokenizer)`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.qwen1 import is_qwen1_dir, load_qwen1_dir, qwen2_config_from_qwen1, read_config_json
from minigpt4qwen.checkpoint.shards import checkpoint_shards
from minigpt4qwen.text.qwen_tokenizer import load_tokenizer

# Existing special tokens reserved for image features, by family: Qwen1 `<|extra_0|>` (what MiniGPT4Qwen used),
# then Qwen2.5 / Qwen3 / Qwen2-VL `<|image_pad|>` (an embedding row these text models never trained).
PLACEHOLDER_CANDIDATES = ("<|extra_0|>", "<|image_pad|>")
# Llama 3.x: the lowest-numbered of its unused `<|reserved_special_token_N|>` tokens.
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_(\d+)\|>")
# Added when the tokenizer has none of the above (e.g. the original Qwen2, whose only specials are
# endoftext/im_start/im_end); `prepare_placeholder` then grows the embeddings if the new id needs a row.
NEW_PLACEHOLDER = "<image>"

logger = logging.getLogger(__name__)


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
    quantize: str | None = None,
    float8_weights: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer from a local directory; remote code is never run.

    Args:
        path: a Qwen1 directory (converted to `Qwen2ForCausalLM`) or a `transformers`-native one.
        dtype: parameter dtype.
        device: where the parameters go.
        attn_implementation: `"sdpa"`, `"eager"` or `"flash_attention_2"`.
        quantize: "int8" / "int4": the decoder blocks' Linear weights are quantized on `device` while the shards
            stream in (torchao, `model/quantization.py`); the output head stays for `quantize_language_model`.
        float8_weights: the decoder blocks' Linear weights are frozen and stored in float8 on `device`
            (`model/float8_weights.py`): while a Qwen1 directory's shards stream in; a `transformers`-native one is
            read whole on the host first (its loader has no per-shard hook) and reaches `device` one layer at a time.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        FileNotFoundError: no such directory, no config.json, or no weight files.
        ValueError: a model type that needs remote code, or a Qwen1 config Qwen2 cannot express.
        CheckpointError: (Qwen1) weights that do not match the config.
    """
    if is_qwen1_dir(path):
        model = load_qwen1_dir(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                               quantize=quantize, float8_weights=float8_weights)
        return model, load_tokenizer(path)
    read_config_json(path)  # a clear error for a missing directory / config.json before transformers' own
    checkpoint_shards(path)  # and for a directory without weights
    extra = {}
    if quantize:  # transformers quantizes each Linear as it loads (its default leaves the output head out)
        from transformers import TorchAoConfig

        from minigpt4qwen.model.quantization import torchao_config

        extra["quantization_config"] = TorchAoConfig(quant_type=torchao_config(quantize, device, dtype))
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        device_map={"": torch.device("cpu" if float8_weights else device)},
        local_files_only=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
        **extra,
    )
    if quantize:
        # Loaded like a Qwen1 directory: the composite's config records the quantization (an LLM config holding
        # transformers' TorchAoConfig would be copied into exports and make them look like a transformers load).
        del model.config.quantization_config
        model.hf_quantizer = None
    if float8_weights:
        from minigpt4qwen.model.float8_weights import store_loaded_weights_in_float8

        store_loaded_weights_in_float8(model, device)
        model.to(device)  # the rest: embeddings, norms, output head
    return model.eval(), load_tokenizer(path)


def placeholder_token_id(tokenizer: PreTrainedTokenizerBase, token: str | None = None) -> int:
    """The id of the token whose embedding rows are replaced by image features.

    It is always a special token, so text never produces it (text is encoded with special tokens split). Unless
    `token` names one, the first that exists of: `<|extra_0|>` (Qwen1), `<|image_pad|>` (Qwen2.5 / Qwen3), the
    lowest `<|reserved_special_token_N|>` (Llama 3.x), `<image>`. With none of them, `<image>` is added to this
    tokenizer as a special token; `prepare_placeholder` then checks that the model has a row for it.

    Args:
        tokenizer: the LLM's tokenizer; it may gain `<image>` (see above).
        token: a special token to use instead (`model.placeholder_token`).

    Returns:
        The placeholder token id.

    Raises:
        ValueError: `token` is not a special token of the tokenizer.
    """
    specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if token is not None:
        if token not in specials:
            raise ValueError(
                f"model.placeholder_token {token!r} is not a special token of this tokenizer, so text could produce "
                f"it; choose one of its special tokens the chat template never writes, e.g. {sorted(specials)[:5]}"
            )
        return specials[token]
    for candidate in PLACEHOLDER_CANDIDATES:
        if candidate in specials:
            return specials[candidate]
    reserved = sorted((int(m.group(1)), t) for t in specials if (m := RESERVED_TOKEN.fullmatch(t)))
    if reserved:
        return specials[reserved[0][1]]
    if NEW_PLACEHOLDER not in specials:
        # special + not normalized: always one atomic token, never split or changed by the normalizer.
        tokenizer.add_tokens([AddedToken(NEW_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(NEW_PLACEHOLDER)


def prepare_placeholder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token: str | None = None) -> int:
    """`placeholder_token_id`, plus an embedding row for it if the model has none.

    Only a tokenizer with no reserved token gets a new one (`<image>`), and its id usually still falls inside
    the embedding matrix (vocabularies are padded: Qwen2's 151646 < 151936 rows). When it does not, the input
    and output embeddings are resized to `len(tokenizer)` (transformers initialises new rows at the mean of the
    old ones). The input row is never read (image features replace it) and the id is never a target, so its
    values do not matter; the resized LLM is what checkpoints of a trained LLM and exports hold.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (may gain `<image>`).
        token: as in `placeholder_token_id`.

    Returns:
        The placeholder token id, a row of the model's embeddings.
    """
    image_token_id = placeholder_token_id(tokenizer, token)
    rows = model.get_input_embeddings().num_embeddings
    if image_token_id >= rows:
        model.resize_token_embeddings(len(tokenizer))
        logger.warning("%s (id %d) had no embedding row: the LLM's embeddings grew from %d to %d rows",
                       tokenizer.convert_ids_to_tokens(image_token_id), image_token_id, rows, len(tokenizer))
    return image_token_id
