"""Export to, and load from, a self-contained Hugging Face directory.

The directory is a `Blip2ForConditionalGeneration` checkpoint (config, sharded safetensors, tokenizer with chat
template, BLIP image processor, generation config): plain `transformers` loads it with no custom code. Only the
ln_vision eps (1e-5, not representable in Blip2Config) is lost there; `load_exported` restores it exactly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import Blip2Config, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_torchvision_available

from minigpt4qwen.checkpoint.keymap import CheckpointError, load_checked
from minigpt4qwen.checkpoint.native import atomic_directory, shared_aliases, tie_aliases
from minigpt4qwen.checkpoint.quantized_safetensors import flatten_quantized, unflatten_quantized
from minigpt4qwen.model.fused_projections import FUSED_TYPES
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.quantization import (
    CONFIG_ATTRIBUTE,
    adapt_quantized_layers,
    is_quantized,
    quantize_language_model,
)
from minigpt4qwen.text.conversation import end_of_turn_token_id
from minigpt4qwen.text.qwen_tokenizer import load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=8)
def chat_stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Stop ids: ChatML's `<|im_end|>` and `<|im_start|>` (the original stopped on both), the end-of-turn token
    the tokenizer's chat template writes after a reply (`<|eot_id|>` for Llama 3), and the tokenizer's eos.
    Cached per tokenizer: front ends ask for every reply."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")]
    ids = [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    for extra in (end_of_turn_token_id(tokenizer), tokenizer.eos_token_id):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return tuple(ids)


def export_hf(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
              *, max_shard_size: str = "5GB") -> Path:
    """Writes the whole model as a Hugging Face `Blip2ForConditionalGeneration` directory (atomically).

    Args:
        model: the model; its state-dict names already are `Blip2ForConditionalGeneration`'s.
        tokenizer: saved beside it (with its chat template).
        out_dir: target directory (replaced if it exists).
        max_shard_size: safetensors shard size.

    Raises:
        ValueError: the model's projections are fused for decoding (`model/fused_projections.py`).

    A quantized LLM (`model.config.llm_quantization`) is written in torchao's safetensors layout (each quantized
    weight as its parts, described in every shard's metadata); `load_exported` rebuilds it, plain transformers not.
    """
    if fused := [name for name, module in model.named_modules() if isinstance(module, FUSED_TYPES)][:2]:
        raise ValueError(f"{fused}: the projections of this model are fused for decoding (as `load_for_inference` "
                         "loads a model for chat and serving), so its weights are named differently from the "
                         "checkpoint's: export the model as loaded for training or conversion instead")
    size = model.config.vision_config.image_size
    stops = chat_stop_token_ids(tokenizer)
    with atomic_directory(out_dir) as tmp:
        config = Blip2Config.from_dict(model.config.to_dict())
        config.architectures = ["Blip2ForConditionalGeneration"]
        config.save_pretrained(tmp)
        full = model.state_dict()
        # A tied tensor is written once, under its first key (the input embeddings, as transformers' own saves do):
        # loaders tie the other key to it from the config.
        aliases = shared_aliases(full)
        state = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in aliases}
        metadata = None
        if getattr(model.config, CONFIG_ATTRIBUTE, None):
            state, metadata = flatten_quantized(state)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata=metadata)
        tokenizer.save_pretrained(tmp)
        _blip_image_processor_class()(size={"height": size, "width": size}, resample=3, image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), do_convert_rgb=True).save_pretrained(tmp)
        GenerationConfig(eos_token_id=list(stops), pad_token_id=tokenizer.pad_token_id, do_sample=False,
                         max_new_tokens=512).save_pretrained(tmp)
    return Path(out_dir)


def _blip_image_processor_class() -> type:
    """The BLIP image processor that needs no torchvision where there is none.

    Newer transformers make `BlipImageProcessor` the torchvision-backed class and warn ("Install torchvision")
    before falling back to `BlipImageProcessorPil`; installing torchvision breaks the CPU builds of torch that
    many users have. Both classes write the same preprocessor_config.json (type "BlipImageProcessor").
    """
    pil_class = getattr(transformers, "BlipImageProcessorPil", None)
    if pil_class is not None and not is_torchvision_available():
        return pil_class
    return transformers.BlipImageProcessor


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the directory's safetensors files, and their metadata (merged)."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory}: weight file {name} is missing")
        try:
            tensors.update(load_file(str(file)))
            with safe_open(str(file), framework="pt") as f:
                metadata.update(f.metadata() or {})
        except Exception as err:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    return tensors, metadata


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """{alias: key} of the weights `model` ties: those its transformers configs declare (a model built under
    `init_empty_weights` is not tied yet) and those it already shares."""
    tied = {}
    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            declared = module.get_expanded_tied_weights_keys(all_submodels=False)
            tied.update({f"{prefix}.{alias}" if prefix else alias: f"{prefix}.{kept}" if prefix else kept
                         for alias, kept in declared.items()})
    return {**tied, **shared_aliases(model.state_dict(keep_vars=True))}


def _provide_tied(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, str]:
    """Gives each pair of weights the model ties (built from its config, e.g. an LLM's output head and input
    embeddings) the one tensor a file stores for both (either key: transformers keeps the embeddings, older exports
    of ours the head), in place. A pair the file holds neither key of stays missing for the strict check; one it
    holds both keys of stays as stored (untied, as transformers loads it).

    Returns:
        The pairs provided this way ({alias: key}), to be tied again once loaded.
    """
    provided = {}
    for alias, kept in aliases.items():
        if alias in tensors and kept not in tensors:
            tensors[kept] = tensors[alias]
        elif kept in tensors and alias not in tensors:
            tensors[alias] = tensors[kept]
        else:
            continue
        provided[alias] = kept
    return provided


def load_exported(directory: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  quantize: str | None = None) -> tuple[MiniGPT4Qwen, PreTrainedTokenizerBase]:
    """Loads an `export_hf` directory (or any BLIP-2 directory with a decoder-only LLM) as a `MiniGPT4Qwen`.

    A quantized export (`llm_quantization` in config.json) keeps its LLM's quantized weights as stored (`dtype`
    casts the other tensors) and needs torchao; an int4 one runs on CUDA only. `quantize` ("int8" / "int4")
    quantizes an unquantized export's LLM one layer at a time onto `device` (its mode, or None, for a quantized one).

    Raises:
        FileNotFoundError: no such directory. CheckpointError: missing/corrupt weights or mismatching keys.
        ImportError: a quantized export without torchao. ValueError: an int4 export for a device other than CUDA,
            or `quantize` other than the export's quantization.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a directory written by `minigpt4qwen export`)")
    config = Blip2Config.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = MiniGPT4Qwen(config)
    tensors, metadata = _read_weights(directory)
    if quantized := getattr(config, CONFIG_ATTRIBUTE, None):
        if quantize not in (None, quantized):
            raise ValueError(f"{directory}: its LLM is already {quantized}: load it without --quantize (or quantize "
                             f"an unquantized export to {quantize})")
        tensors = unflatten_quantized(tensors, metadata, quantized, device=device, source=str(directory))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and not is_quantized(v) else v for k, v in tensors.items()}
    tied = _provide_tied(tensors, _tied_keys(model))
    # Meta parameters take the stored dtypes, so loading assigns the tensors without a cast or a copy.
    for name, param in model.named_parameters():
        if name in tensors:
            param.data = torch.empty_like(param, dtype=tensors[name].dtype, device="meta")
    load_checked(model, tensors, source=str(directory), allow_missing=False)
    tie_aliases(model, tied)
    if quantized:
        adapt_quantized_layers(model.language_model)
    if quantize and not quantized:
        model.language_model.requires_grad_(False)  # quantized weights are frozen
        quantize_language_model(model, quantize, device=device)
    return model.to(device).eval(), load_tokenizer(directory)
