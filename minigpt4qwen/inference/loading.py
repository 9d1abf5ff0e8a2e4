"""Command-line options shared by the inference front ends (chat, webui, serve, generate, eval) and the model loading
behind them; the batching scheduler's options are in `scheduler_options.py`.

A model comes from an exported directory (`--model-dir`), a YAML config, or a preset of the original project's
weight layout plus a checkpoint; it runs on the CPU, one GPU, or with its LLM spread over every visible GPU.
Heavy imports happen inside the functions, so registering the options keeps `minigpt4qwen --help` instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
    from minigpt4qwen.inference.generation import GenerationSettings
    from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("int8", "int4")  # model/quantization.py's modes (not imported here: it imports torch)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options that choose the model, its device(s) and dtype.

    Args:
        parser: a subcommand's parser.
    """
    g = parser.add_argument_group("model")
    g.add_argument("--model-dir", help="a directory written by `minigpt4qwen export` (replaces the options below)")
    g.add_argument("--model-type", default="qwen7b_chat",
                   choices=["qwen7b_chat", "qwen14b_chat", "qwen25_7b_instruct", "qwen25_14b_instruct", "qwen3_8b",
                            "llama31_8b_instruct"],
                   help="preset that finds the weights in the original cache/ckpt layout")
    g.add_argument("-c", "--checkpoint", help="trained checkpoint: ours, or the original project's model.pth")
    g.add_argument("--config", help="YAML whose model section replaces the preset")
    g.add_argument("--cache-root", default="cache", help="the original project's weight folder")
    g.add_argument("--cpu-only", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--llm-device-map", choices=["auto"],
                   help="spread the LLM's layers over every visible GPU (the vision parts go on the first)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: fp32 on the CPU; on a GPU the config's dtypes (bf16 LLM) or the export's")
    g.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantize the LLM's weights with torchao while they load (int4: CUDA in bf16, or the CPU); "
                        "an export written with --quantize is already quantized. On a GPU int4 decodes fastest; "
                        "int8 decodes slower than bf16 (each weight is cast to bf16 per step) unless "
                        "--quantize-kernels gemlite, or in a chat --compile-decode (minutes of compiling)")
    g.add_argument("--quantize-kernels", choices=("torchao", "gemlite"), default="torchao",
                   help="what computes a quantized LLM's layers on a GPU: torchao's kernels, or gemlite's Triton "
                        "kernels (pip install 'minigpt4qwen[gemlite]'; the same weights, repacked at load): on one "
                        "H100 7B int8 decodes at 280 tokens/s with --compile-decode (torchao: 201) and 14B int4's "
                        "first token takes 25 ms (torchao: 45); torchao's compiled int4 decodes faster")


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options of the CUDA-graph decoder used by the chat front ends.

    Args:
        parser: a subcommand's parser.
    """
    g = parser.add_argument_group("fast decoding (one GPU; every reply but beam search)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="answer with transformers' generate instead of the CUDA-graph decoder")
    g.add_argument("--compile-decode", action="store_true",
                   help="also compile the decode step: fused kernels, about 35%% faster decoding at batch 1 after "
                        "a minute or two of compiling at start-up (and again when a conversation outgrows the "
                        "KV cache: 1024, 2048, 4096, ... tokens)")


def fast_decoder(model: MiniGPT4Qwen, args: argparse.Namespace) -> GraphDecoder | None:
    """The CUDA-graph decoder for `model` as the options of `add_decoder_options` ask, or None when they
    turn it off or the model is not on one GPU (the CPU, or an LLM spread over several GPUs).

    Args:
        model: the loaded model.
        args: parsed options.
    """
    from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder

    devices = {p.device for p in model.parameters()}
    if args.no_cuda_graphs or len(devices) != 1 or next(iter(devices)).type != "cuda":
        return None
    torchao_int8 = getattr(args, "quantize", None) == "int8" and getattr(args, "quantize_kernels", None) != "gemlite"
    if torchao_int8 and not args.compile_decode:
        print("[note] int8 weights decode slower than bf16 without --compile-decode (torchao's eager int8 linear "
              "casts each weight to bf16 on every call); int4 is the fast setting", file=sys.stderr)
    try:
        return GraphDecoder(model, compile_mode="default" if args.compile_decode else None)
    except ValueError as err:  # e.g. an LLM with sliding-window layers
        print(f"[note] replies use transformers' generate: {err}", file=sys.stderr)
        return None


def add_generation_options(parser: argparse.ArgumentParser, *, seed: int | None = None) -> None:
    """Adds one option per `GenerationSettings` field (defaults: greedy decoding, up to 512 new tokens).

    Args:
        parser: a subcommand's parser.
        seed: the default seed.
    """
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("-s", "--seed", type=int, default=seed, help="seed torch before each generation")
    g.add_argument("--stop", action="append", default=[], help="a string that ends the reply (repeatable)")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The `GenerationSettings` of the options added by `add_generation_options`.

    Raises:
        ValueError: a value out of range (named).
    """
    from minigpt4qwen.inference.generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=tuple(args.stop),
    ).check()


def load_for_inference(args: argparse.Namespace) -> tuple[MiniGPT4Qwen, PreTrainedTokenizerBase]:
    """Loads the model chosen by the options of `add_model_options`, placed and cast for inference.

    Args:
        args: parsed options.

    Returns:
        (model in eval mode, frozen, its LLM's projections fused for decoding (`fuse_projections`), tokenizer).

    Raises:
        FileNotFoundError / CheckpointError: missing or mismatching weights.
        ValueError: `--llm-device-map auto` without a GPU, or an invalid config.
    """
    import torch

    from minigpt4qwen.model.fused_projections import fuse_projections
    from minigpt4qwen.model.parts import parse_dtype

    if args.llm_device_map and (args.cpu_only or not torch.cuda.is_available()):
        raise ValueError("--llm-device-map auto spreads the LLM over GPUs: it needs CUDA and no --cpu-only")
    quantize = getattr(args, "quantize", None)
    if quantize and args.llm_device_map:
        raise ValueError("--quantize keeps the LLM on one device: drop --llm-device-map")
    device = "cpu" if args.cpu_only or not torch.cuda.is_available() else "cuda"
    dtype = "fp32" if args.dtype == "auto" and device == "cpu" else args.dtype
    # With a device map, every part first lands on the CPU and is then dispatched layer by layer.
    load_device = "cpu" if args.llm_device_map else device
    if args.model_dir:
        from minigpt4qwen.checkpoint.export import load_exported

        model, tokenizer = load_exported(args.model_dir, dtype=None if dtype == "auto" else parse_dtype(dtype),
                                         device=load_device, quantize=quantize)
    else:
        model, tokenizer = _build(args, dtype, load_device)
    # Fewer, larger GEMVs per decode step; before spreading, so each layer moves with its fused weights.
    fuse_projections(model.requires_grad_(False).language_model)
    if getattr(args, "quantize_kernels", "torchao") == "gemlite":
        _route_through_gemlite(model, device)
    if device == "cuda":  # return the unfused weights' blocks: the larger fused weights cannot reuse them
        torch.cuda.empty_cache()
    if args.llm_device_map:
        spread_language_model(model)
    return model.eval(), tokenizer


def _route_through_gemlite(model: MiniGPT4Qwen, device: str) -> None:
    """Repacks the quantized LLM's layers for gemlite's kernels (`model/gemlite_layers.py`), or says why not."""
    from minigpt4qwen.model.gemlite_layers import route_through_gemlite
    from minigpt4qwen.model.quantization import CONFIG_ATTRIBUTE

    if getattr(model.config, CONFIG_ATTRIBUTE, None) is None:
        raise ValueError("--quantize-kernels gemlite computes quantized layers: add --quantize int8|int4 (or load an "
                         "export written with --quantize)")
    if device != "cuda":
        raise ValueError("--quantize-kernels gemlite runs on a CUDA GPU: drop it (or --cpu-only)")
    route_through_gemlite(model.language_model)


def _build(args: argparse.Namespace, dtype: str, device: str) -> tuple[MiniGPT4Qwen, PreTrainedTokenizerBase]:
    """The model of `--config`, or of the `--model-type` preset, with `-c` loaded and nothing trainable."""
    from minigpt4qwen.checkpoint.assemble import build_model
    from minigpt4qwen.config import ModelConfig, load_config
    from minigpt4qwen.model.parts import PartDtypes, TrainableParts
    from minigpt4qwen.training.config import RunConfig

    if args.config:
        model_cfg = load_config(args.config, [], RunConfig).model
    else:
        model_cfg = ModelConfig(preset=args.model_type, cache_root=args.cache_root)
    model_cfg = dataclasses.replace(
        model_cfg, checkpoint=args.checkpoint or model_cfg.checkpoint,
        trainable=TrainableParts(language_projection=False),
        dtypes=model_cfg.dtypes if dtype == "auto" else PartDtypes.uniform(dtype),
        quantize=getattr(args, "quantize", None) or model_cfg.quantize,
    )
    return build_model(model_cfg, device=device, fresh_projection=False)


def spread_language_model(model: MiniGPT4Qwen) -> dict[str, int | str]:
    """Dispatches the LLM's layers over the visible GPUs (accelerate's balanced `device_map="auto"`) and puts
    the vision tower, Q-Former and projection on the GPU that holds the token embeddings.

    Args:
        model: a model on the CPU.

    Returns:
        The LLM's device map (module name -> GPU index, or "cpu" for layers that did not fit).
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    lm = model.language_model
    no_split = list(getattr(lm, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(lm, no_split_module_classes=no_split)
    # The first GPU also holds the vision parts and the image features: keep their room free there.
    others = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                 if not name.startswith("language_model."))
    if 0 in max_memory:
        max_memory[0] = max(int(max_memory[0]) - 2 * others, 0)
    device_map = infer_auto_device_map(lm, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(lm, device_map=device_map)
    main = lm.get_input_embeddings().weight.device  # image features are merged into the embeddings there
    for name in ("vision_model", "qformer", "language_projection"):
        getattr(model, name).to(main)
    model.query_tokens.data = model.query_tokens.data.to(main)
    return device_map

