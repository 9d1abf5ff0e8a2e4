"""Weight-only quantization of the LLM with torchao: `quantize_language_model(model, "int8" | "int4")`.

What is quantized: every `nn.Linear` of the LLM (the decoder blocks' attention and MLP projections) in the chosen
mode, and its output head in int8 whatever the mode (per-row int8 costs the logits almost nothing, while int4 on
the head is where weight-only quantization loses most; the head of a 14B model is still 0.7 GiB smaller). A head
tied to the input embeddings stays as it is, as do the embeddings, norms, biases, the vision tower, the Q-Former
and the projection. Activations stay in the LLM's dtype. `adapt_quantized_layers` then changes how two kinds of
layer compute (same parameters): an int8 head runs in blocks of vocabulary rows (torchao's eager int8 matmul casts
its whole weight first, 1.45 GiB at 14B), and CUDA int4 layers run many-row calls (prefills) as bf16 matmuls over
a dequantized copy (`model/int4_many_rows.py`: tinygemm's cost grows with the rows).

- int8: symmetric, one scale per output row (`Int8WeightOnlyConfig`): any device and float dtype, with a
  backward, so a frozen int8 LLM passes gradients to the projection in training.
- int4: asymmetric, groups of `INT4_GROUP_SIZE` along the input (tinygemm's scheme): on CUDA torchao's tinygemm
  tile-packed layout (bf16, compute capability >= 8), on the CPU torchao's prototype `Int4OpaqueTensor` (ATen's CPU
  tinygemm kernel). Neither kernel has a backward: int4 is for inference only. The packed layout is the device's,
  so an int4 model is quantized on the device it runs on.

Quantizing is idempotent per weight: weights still on meta (not loaded yet) or already quantized are skipped, so
loaders call `quantize_llm_weights` after each shard (a streamed load never holds the whole model in bf16) and
`quantize_language_model` finishes whatever is left. torchao is imported only when a function needs it.

torchao's configs would also switch inductor's coordinate-descent tuning on for the whole process; here they do
not (`set_inductor_config=False`): only the compiled decode steps of a quantized model turn it on, for their own
compiles (`model/compilation.py::compile_decode_step`), so quantizing changes nothing else that compiles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minigpt4qwen.model.int4_many_rows import route_many_rows_through_bf16
from minigpt4qwen.model.row_blocked_linear import block_output_head

if TYPE_CHECKING:
    from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

QUANT_MODES = ("int8", "int4")
INT4_GROUP_SIZE = 128  # tinygemm's usual group; every Qwen / Llama hidden and MLP width is a multiple of it
# The attribute of the model's Blip2Config naming the LLM's quantization (written into config.json by export).
CONFIG_ATTRIBUTE = "llm_quantization"
# int8 weights this large are quantized on the host (`_quantize_layer`): output heads of 0.5B+ parameters.
HOST_INT8_ELEMENTS = 2**29
# int8 weights are quantized this many elements' worth of rows at a time (`_quantize_int8_by_rows`).
INT8_BLOCK_ELEMENTS = 2**26
INT8_TYPE = "Int8Tensor"  # torchao's per-row int8 weight (qdata [N, K] int8, scale [N, 1])
INSTALL_HINT = "pip install 'minigpt4qwen[quant]' (or pip install torchao)"


def import_torchao() -> Any:
    """The `torchao` module, or an ImportError that says how to install it."""
    try:
        import torchao
        import torchao.quantization  # noqa: F401  (registers the quantized tensor types)
    except ImportError as err:
        raise ImportError(f"quantized LLM weights need torchao ({err}): {INSTALL_HINT}") from None
    return torchao


def check_mode(mode: str, name: str = "quantization") -> str:
    """Returns `mode` if it is one of `QUANT_MODES`; a ValueError naming `name` (e.g. the config key) otherwise."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown {name} {mode!r}: use one of {QUANT_MODES}")
    return mode


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one of torchao's quantized tensor types (checked without importing torchao)."""
    return type(tensor).__module__.split(".", 1)[0] == "torchao"


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: for a quantized one the sum of its parts (packed data, scales, zero points),
    where `numel() * element_size()` would count it in its original dtype."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(part) for name in names if (part := getattr(tensor, name)) is not None)
    return tensor.numel() * tensor.element_size()


def torchao_config(mode: str, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The torchao config that quantizes a weight in `mode` for `device` (see the module docstring).

    Raises:
        ImportError: torchao is missing. ValueError: an unknown mode, or int4 on a device or dtype it lacks.
    """
    check_mode(mode)
    import_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    device = torch.device(device)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA (tinygemm) runs in bf16, not {dtype}: use --dtype auto or bf16 "
                             "(model.dtypes.language_model=bf16)")
        return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    if device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False)
    raise ValueError(f"int4 weights run on CUDA or the CPU, not {device.type}: use int8")


def quantization_targets(llm: nn.Module, mode: str) -> dict[str, tuple[nn.Linear, str]]:
    """The LLM's Linear layers to quantize, by module name, each with its mode: `mode` for the decoder blocks,
    int8 for the output head (none for a head tied to the input embeddings)."""
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    embeddings = llm.get_input_embeddings() if hasattr(llm, "get_input_embeddings") else None
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    targets = {}
    for name, module in llm.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is head:
            if not tied:
                targets[name] = (module, "int8")
        else:
            targets[name] = (module, mode)
    return targets


def quantize_llm_weights(llm: nn.Module, mode: str, *, device: torch.device | str | None = None) -> int:
    """Quantizes each target Linear (`quantization_targets`) whose weight is loaded and not yet quantized.

    Args:
        llm: the causal LM, possibly still partly on meta (a load in progress).
        mode: "int8" or "int4".
        device: move each layer there just before quantizing it (so a device never holds the whole model
            unquantized); None quantizes where the weights are.

    Returns:
        The number of layers quantized by this call.

    Raises:
        ImportError: torchao is missing. ValueError: see `torchao_config`; an int4 layer whose input width is
            not a multiple of `INT4_GROUP_SIZE`.
    """
    done = 0
    for name, (module, layer_mode) in quantization_targets(llm, check_mode(mode)).items():
        weight = module.weight
        if weight.is_meta or is_quantized(weight):
            continue
        if layer_mode == "int4" and module.in_features % INT4_GROUP_SIZE:
            raise ValueError(f"{name}: int4 quantizes groups of {INT4_GROUP_SIZE} inputs, but this layer has "
                             f"{module.in_features}: use int8")
        _quantize_layer(module, layer_mode, torch.device(device) if device is not None else module.weight.device)
        done += 1
    adapt_quantized_layers(llm)
    return done


def adapt_quantized_layers(llm: nn.Module) -> None:
    """Computes a quantized output head in blocks of rows (`RowBlockedLinear`) and the many-row calls of CUDA int4
    layers through their dequantized weight (`ManyRowInt4Linear`), both with the same parameters; layers that are
    unquantized, tied, small or already adapted are left as they are. Loaders of quantized weights call it after
    loading."""
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if head is not None and is_quantized(head.weight):
        block_output_head(llm, dtype_bytes=torch.finfo(head.weight.dtype).bits // 8)
    route_many_rows_through_bf16(llm)


def _quantize_layer(module: nn.Linear, mode: str, device: torch.device) -> None:
    """Quantizes one Linear in place with torchao for `device` and leaves it there; an int8 weight of
    `HOST_INT8_ELEMENTS` or more bound for a GPU is quantized on the host first."""
    from torchao.quantization import quantize_

    # A large int8 weight (an output head) bound for a GPU is quantized on the host: the GPU then never holds its
    # bf16 copy beside the rest of the model (1.5 GiB for 14B's head).
    on_host = mode == "int8" and device.type == "cuda" and module.weight.numel() >= HOST_INT8_ELEMENTS
    module.to("cpu" if on_host else device)
    config = torchao_config(mode, module.weight.device, module.weight.dtype)
    if mode == "int8" and module.weight.numel() > INT8_BLOCK_ELEMENTS:
        _quantize_int8_by_rows(module, config)
    else:
        quantize_(module, config, filter_fn=lambda m, _fqn, target=module: m is target)
    module.to(device)


def _quantize_int8_by_rows(module: nn.Linear, config: Any) -> None:
    """Quantizes an int8 weight `INT8_BLOCK_ELEMENTS` at a time, into one torchao weight with the numbers of a
    whole-weight quantization: torchao computes the scales through fp32 copies of all it is given (+5.9 GiB of
    host memory for 14B's output head), and per-row int8 quantizes each row on its own."""
    from torchao.quantization import quantize_

    weight, rows = module.weight.detach(), max(1, INT8_BLOCK_ELEMENTS // module.in_features)
    qdata = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, weight.shape[0], rows):
        rows_here = weight[start:start + rows]
        block = nn.Linear(module.in_features, len(rows_here), bias=False, device="meta")
        block.weight = nn.Parameter(rows_here, requires_grad=False)
        quantize_(block, config)
        part = block.weight
        extras = [name for name in ("act_quant_scale", "act_quant_zero_point", "act_pre_scale", "act_quant_kwargs")
                  if getattr(part, name, None) is not None]
        if type(part).__name__ != INT8_TYPE or extras or list(part.block_size) != [1, module.in_features]:
            raise TypeError(f"expected torchao's per-row int8 weight-only tensor, got {type(part).__name__} "
                            f"(block size {part.block_size}, {extras or 'no activation quantization'})")
        qdata[start:start + rows] = part.qdata
        scales.append(part.scale)
        zeros.append(part.zero_point)
    zero = None if zeros[0] is None else torch.cat(zeros)
    module.weight = nn.Parameter(type(part)(qdata, torch.cat(scales), part.block_size, part.dtype, zero_point=zero,
                                            reduce_range=part.reduce_range), requires_grad=False)


def quantize_language_model(model: MiniGPT4Qwen, mode: str, *, device: torch.device | str | None = None
                            ) -> MiniGPT4Qwen:
    """Quantizes the LLM's weights of a MiniGPT4Qwen in place (what is left unquantized of them) and records the
    mode in `model.config` (so an export says what it holds).

    Args:
        model: the model, its LLM frozen (`set_trainable`; LoRA adapters go on afterwards).
        mode: "int8" or "int4".
        device: as in `quantize_llm_weights` (the rest of the model is not moved).

    Returns:
        `model`.

    Raises:
        ImportError / ValueError: see `quantize_llm_weights`; a model already quantized in the other mode; an
            LLM with trainable parameters (quantized weights do not train).
    """
    current = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if current not in (None, mode):
        raise ValueError(f"the LLM is already quantized to {current}: it cannot become {mode} (quantize the "
                         "unquantized model instead)")
    if trainable := [name for name, p in model.language_model.named_parameters() if p.requires_grad][:3]:
        raise ValueError(f"a quantized LLM is frozen, but {trainable} train: set model.trainable.language_model="
                         "false (train.lora.enabled=true trains adapters on the quantized LLM)")
    quantize_llm_weights(model.language_model, mode, device=device)
    setattr(model.config, CONFIG_ATTRIBUTE, mode)
    return model


def quantized_parameter_names(module: nn.Module) -> list[str]:
    """Names of the module's quantized parameters (e.g. for DDP to leave alone: they are frozen and loaded
    identically on every rank, and torchao's tensors do not flatten into DDP's broadcast buckets)."""
    return [name for name, p in module.named_parameters() if is_quantized(p)]
