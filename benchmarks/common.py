"""Full-size models with random weights for benchmarks, built from the real configs, and the machine description.

The model is built on the meta device and materialised directly on the GPU (no CPU copy), with norms at 1 and
other weights N(0, 0.02), which keeps bf16 activations in a realistic range.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from minigpt4qwen.checkpoint.qwen1 import qwen2_config_from_qwen1
from minigpt4qwen.model.configs import (
    eva_vit_g_config,
    minigpt4qwen_config,
    tiny_qformer_config,
    tiny_qwen2_config,
    tiny_vision_config,
)
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.parts import PartDtypes

CONFIGS = Path(__file__).parent / "configs"
EXTRA_0 = 151646


def build_random_model(size: str, device: str, dtypes: PartDtypes) -> MiniGPT4Qwen:
    """EVA ViT-g + Q-Former + a Qwen-7B/14B-Chat-shaped Qwen2 LLM ('7b', '14b'), or 'tiny' for a CPU dry run."""
    config = benchmark_config(size)
    with init_empty_weights(include_buffers=False):
        model = MiniGPT4Qwen(config)
    model.cast_parts(dtypes)
    _materialise_random(model, device)
    return model.to(device)


def build_random_plain(size: str, device: str) -> nn.Module:
    """The same architecture as plain transformers' `Blip2ForConditionalGeneration` (bf16, fp32 projection):
    the "plain transformers" baseline of anchors.md. Its state-dict names are ours."""
    from transformers import Blip2ForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(benchmark_config(size))
    model.to(torch.bfloat16)
    model.language_projection.to(torch.float32)
    _materialise_random(model, device)
    return model.to(device)


def benchmark_config(size: str):
    """The composite config of a benchmark size."""
    if size == "tiny":
        config = minigpt4qwen_config(tiny_qwen2_config(vocab_size=151936, hidden_size=64), image_token_id=EXTRA_0,
                                     vision_config=tiny_vision_config(224), qformer_config=tiny_qformer_config(),
                                     num_query_tokens=32)
    else:
        qwen1 = json.loads((CONFIGS / f"qwen{size}_chat.json").read_text())
        config = minigpt4qwen_config(qwen2_config_from_qwen1(qwen1), image_token_id=EXTRA_0,
                                     vision_config=eva_vit_g_config(224))
    config.text_config._attn_implementation = "sdpa"
    return config


def _materialise_random(model: nn.Module, device: str) -> None:
    fill_random(model, device, torch.Generator(device=device).manual_seed(0))


def fill_random(module: nn.Module, device: str, generator: torch.Generator) -> None:
    """Random values on `device` for the parameters of `module` still on the meta device (norm weights 1,
    biases and other norm parameters 0, the rest N(0, 0.02)); parameters already materialised are kept."""
    for module_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if "norm" in f"{module_name}.{name}".lower() and name == "weight":
                data.fill_(1.0)
            elif name == "bias" or "norm" in module_name.lower():
                data.zero_()
            else:
                data.normal_(0.0, 0.02, generator=generator)
            setattr(owner, name, nn.Parameter(data, requires_grad=param.requires_grad))


def timed_training(model: nn.Module, step_batches: list[dict], warmup: int, device: str) -> tuple[float, float]:
    """Projection-only training (AdamW, bf16 autocast) over `step_batches`, the first `warmup` untimed.

    Returns:
        (seconds per timed step, peak GiB).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak(device)
    for i, data in enumerate(step_batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out = model(**data)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / (len(step_batches) - warmup), peak_gib(device)


def machine() -> str:
    """GPU name, versions and date: printed with every table."""
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return (f"{gpu} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"python {platform.python_version()} | {time.strftime('%Y-%m-%d')}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn, device: str, repeats: int) -> float:
    """Mean seconds per call of `fn` over `repeats` calls in a row, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
