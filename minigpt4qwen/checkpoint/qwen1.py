"""Qwen-7B-Chat / Qwen-14B-Chat (Qwen1, remote-code `QWenLMHeadModel`) directories loaded as `Qwen2ForCausalLM`.

The directory is read as data: its `modeling_qwen.py` & co. are never imported. Shards are streamed onto a model
built on meta, so a load needs about one model in the target dtype plus one shard: `load_qwen1_dir(path)`.

Not reproduced: Qwen1's `use_dynamic_ntk` (rotary base grown per sample) and `use_logn_attn` (queries scaled by
log(p)/log(seq_length)). Both act only on sequences longer than `seq_length` (8192 for 7B v1.1, 2048 for 14B):
within it the conversion is exact, beyond it outputs differ from the remote code. The converted config keeps
`use_dynamic_ntk`, `use_logn_attn` and `seq_length` as informational attributes. See mappings.md (iii).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import accelerate
import torch
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from minigpt4qwen.checkpoint.keymap import CheckpointError, KeyMap, KeyRule, drop, load_checked, rename
from minigpt4qwen.checkpoint.shards import check_against_index, checkpoint_shards, read_shard

logger = logging.getLogger(__name__)

QWEN1_EOD_ID = 151643  # <|endoftext|>: Qwen1's eod and pad token; chat turns stop on <|im_end|> at generation time

_REQUIRED = object()  # sentinel: a config field with no default


def _split_qkv(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    # Qwen1 fuses q, k, v row-wise ([3H, H] / [3H]) with heads contiguous inside each third, like Qwen2.
    (fused,) = tensors
    return fused.chunk(3, dim=0)


def qwen1_keymap(source_prefix: str = "", target_prefix: str = "") -> KeyMap:
    """Rules mapping Qwen1 state-dict keys onto `Qwen2ForCausalLM` keys.

    Args:
        source_prefix: prepended to every Qwen1 key (e.g. `"llm_model."` inside a MiniGPT4Qwen checkpoint).
        target_prefix: prepended to every Qwen2 key (e.g. `"language_model."`).

    Returns:
        A `KeyMap`; non-learned buffers of old snapshots are recognised and dropped.
    """
    s, t = source_prefix, target_prefix
    h, layer = f"{s}transformer.h.{{i}}.", f"{t}model.layers.{{i}}."
    return KeyMap(
        "Qwen1 (QWenLMHeadModel)",
        [
            rename(f"{s}transformer.wte.weight", f"{t}model.embed_tokens.weight"),
            rename(f"{h}ln_1.weight", f"{layer}input_layernorm.weight"),
            *(
                KeyRule((f"{h}attn.c_attn.{w}",), tuple(f"{layer}self_attn.{p}_proj.{w}" for p in "qkv"), _split_qkv)
                for w in ("weight", "bias")
            ),
            rename(f"{h}attn.c_proj.weight", f"{layer}self_attn.o_proj.weight"),
            rename(f"{h}ln_2.weight", f"{layer}post_attention_layernorm.weight"),
            # Qwen1 computes c_proj(w1(x) * silu(w2(x))): w1 is the plain factor (up), w2 the activated one (gate).
            # Swapping them still loads without error, so this is the rule to get right.
            rename(f"{h}mlp.w1.weight", f"{layer}mlp.up_proj.weight"),
            rename(f"{h}mlp.w2.weight", f"{layer}mlp.gate_proj.weight"),
            rename(f"{h}mlp.c_proj.weight", f"{layer}mlp.down_proj.weight"),
            rename(f"{s}transformer.ln_f.weight", f"{t}model.norm.weight"),
            rename(f"{s}lm_head.weight", f"{t}lm_head.weight"),
            drop(f"{h}attn.rotary_emb.inv_freq", f"{h}attn.bias", f"{h}attn.masked_bias"),
            drop(f"{s}transformer.rotary_emb.inv_freq"),
        ],
    )


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Parses `path/config.json` (as plain JSON: no config class, no remote code).

    Args:
        path: a model directory.

    Returns:
        The config as a dict.

    Raises:
        FileNotFoundError: `path` is not a directory or has no config.json.
    """
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face model directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face model directory")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def is_qwen1_dir(path: str | Path) -> bool:
    """Whether `path` holds a config.json whose `model_type` is `"qwen"` (Qwen1 remote code)."""
    try:
        return read_config_json(path).get("model_type") == "qwen"
    except FileNotFoundError:
        return False


def _get(config: Mapping[str, Any], *names: str, default: Any = _REQUIRED) -> Any:
    # The Aug-2023 snapshots use GPT-2 style names (n_embd, ...); the late v1.1 configs use HF names.
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is _REQUIRED:
        raise ValueError(f"Qwen1 config has none of {names}")
    return default


def qwen2_config_from_qwen1(qwen1_config: Mapping[str, Any]) -> Qwen2Config:
    """Converts a Qwen1 config.json (early or late naming) into the equivalent `Qwen2Config`.

    Args:
        qwen1_config: the parsed config.json of a Qwen-7B(-Chat) / Qwen-14B(-Chat) directory.

    Returns:
        A `Qwen2Config` with MHA, the halved MLP width, untied embeddings and default RoPE; `use_dynamic_ntk`,
        `use_logn_attn` and `seq_length` are kept as informational attributes (not implemented, see module doc).

    Raises:
        ValueError: a required field is missing, or the config uses partial rotary, a head size other than
            hidden/heads, or biases (`no_bias` false), none of which Qwen2 can express.
    """
    hidden = _get(qwen1_config, "hidden_size", "n_embd")
    heads = _get(qwen1_config, "num_attention_heads", "n_head")
    if (kv_channels := _get(qwen1_config, "kv_channels", default=hidden // heads)) * heads != hidden:
        raise ValueError(f"Qwen1 kv_channels {kv_channels} x {heads} heads != hidden_size {hidden}: not a Qwen2 layout")
    if (rotary_pct := _get(qwen1_config, "rotary_pct", default=1.0)) != 1.0:
        raise ValueError(f"Qwen1 rotary_pct={rotary_pct}: Qwen2 only supports full rotary embeddings (1.0)")
    if not _get(qwen1_config, "no_bias", default=True):
        raise ValueError("Qwen1 no_bias=false: Qwen2 has no bias on o_proj and the MLP")
    # The embedding row count (padded), not the tokenizer length (151851) that early configs call vocab_size.
    vocab = _get(qwen1_config, "padded_vocab_size", "vocab_size")
    seq_length = _get(qwen1_config, "seq_length", default=2048)
    rope_theta = float(_get(qwen1_config, "rotary_emb_base", default=10000.0))
    # Qwen2Model passes pad_token_id to nn.Embedding as padding_idx, which must be a row of the embedding.
    eod = QWEN1_EOD_ID if QWEN1_EOD_ID < vocab else None
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        # Qwen1's ffn size counts both SwiGLU branches; each Linear has half of it.
        intermediate_size=_get(qwen1_config, "intermediate_size", "ffn_hidden_size") // 2,
        num_hidden_layers=_get(qwen1_config, "num_hidden_layers", "n_layer"),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        max_position_embeddings=seq_length,
        rms_norm_eps=_get(qwen1_config, "layer_norm_epsilon", default=1e-6),
        # The only rope field of Qwen2Config in transformers 5.17 and 5.24 (`rope_theta` was 4.x).
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,
        attention_dropout=float(_get(qwen1_config, "attn_dropout_prob", "attn_pdrop", default=0.0)),
        pad_token_id=eod,
        eos_token_id=eod,
        bos_token_id=None,
        use_dynamic_ntk=bool(_get(qwen1_config, "use_dynamic_ntk", default=False)),
        use_logn_attn=bool(_get(qwen1_config, "use_logn_attn", default=False)),
        seq_length=seq_length,
    )


def load_qwen1_dir(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    float8_weights: bool = False,
) -> Qwen2ForCausalLM:
    """Loads a published Qwen1 directory as `Qwen2ForCausalLM`, streaming its shards onto a meta-built model.

    Args:
        path: the directory (config.json + model*.safetensors or pytorch_model*.bin, sharded or not).
        dtype: parameter dtype; each tensor is cast as its shard is read (rotary buffers stay fp32).
        device: where the parameters are materialised.
        attn_implementation: `"sdpa"`, `"eager"` or `"flash_attention_2"`.
        quantize: "int8" / "int4": each shard's Linear weights are quantized on `device` as soon as they are
            loaded (`model/quantization.py`; the output head is left to `quantize_language_model`).
        float8_weights: each shard's block Linear weights are frozen and stored in float8 on `device` as soon as
            they are loaded (`model/float8_weights.py`, training's `model.float8_weights`).

    Returns:
        The model in eval mode. Peak memory is about the model in `dtype` (or quantized) plus one shard.

    Raises:
        FileNotFoundError: no directory, config.json, weights, or a shard named by the index.
        ValueError: a config Qwen2 cannot express (see `qwen2_config_from_qwen1`).
        CheckpointError: unknown keys, shape mismatches, a key in two shards or outside the index, a corrupt
            shard, or parameters that no shard provides.
    """
    start = time.perf_counter()
    path = Path(path)
    config = qwen2_config_from_qwen1(read_config_json(path))
    files, weight_map = checkpoint_shards(path)
    keymap = qwen1_keymap()
    if weight_map is not None and (unknown := keymap.unknown_keys(weight_map)):
        raise CheckpointError(f"{path}: the shard index lists {len(unknown)} non-Qwen1 key(s), e.g. {unknown[:6]}")

    # Parameters on meta in `dtype`; buffers stay real so the fp32 rotary inv_freq is computed as usual.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with accelerate.init_empty_weights(include_buffers=False):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.set_attn_implementation(attn_implementation)

    shrink = f", quantizing to {quantize}" if quantize else ", storing float8 weights" if float8_weights else ""
    # On a terminal only (disable=None): a 14B directory streams for minutes, quantized or not.
    progress = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"loading {path.name}{shrink}", disable=None, dynamic_ncols=True)
    for file in files:
        shard = read_shard(file)
        if weight_map is not None:
            check_against_index(file, set(shard), weight_map)
        converted = keymap.convert(shard, str(file))
        del shard  # dropped buffers are freed now; the rest lives only through `converted`'s views
        tensors: dict[str, torch.Tensor] = {}
        for key in list(converted):
            # copy=True: a parameter must own its storage, not a view of the fused c_attn or of a mmapped file.
            tensors[key] = converted.pop(key).to(device=device, dtype=dtype, copy=True)
        load_checked(model, tensors, str(file), allow_missing=True)
        del tensors  # from here the model holds the weights: a quantized or float8 copy frees its bf16 source
        if quantize:
            from minigpt4qwen.model.quantization import quantize_llm_weights

            quantize_llm_weights(model.model, quantize)
        elif float8_weights:
            from minigpt4qwen.model.float8_weights import store_loaded_weights_in_float8

            store_loaded_weights_in_float8(model)
        progress.update(file.stat().st_size)
    progress.close()

    if missing := [name for name, p in model.named_parameters() if p.is_meta]:
        raise CheckpointError(f"{path}: {len(missing)} parameter(s) found in no shard, e.g. {missing[:6]}")
    model.to(device).eval()  # .to moves the rotary buffers; the parameters are already there
    model.config.dtype = dtype
    model.config.name_or_path = str(path)
    summary = f"{len(files)} file(s), {model.num_parameters():,} params, {dtype} on {device}"
    logger.info("loaded Qwen1 %s as Qwen2ForCausalLM: %s, %.1fs", path, summary, time.perf_counter() - start)
    return model
