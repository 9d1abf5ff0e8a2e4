"""Quantized LLM weights in safetensors files (what `export --quantize` writes and loading reads): torchao's
format, in which a quantized `x.weight` is stored as plain tensors (`x._weight_qdata`, `x._weight_scale`, ...) and
described by a JSON entry per tensor in the files' metadata."""

from __future__ import annotations

import json

import torch

from minigpt4qwen.model.quantization import CONFIG_ATTRIBUTE, check_mode, import_torchao, is_quantized


def flatten_quantized(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict with quantized tensors as plain tensors plus safetensors metadata (torchao's format: a
    quantized `x.weight` becomes `x._weight_qdata`, `x._weight_scale`, ... and a JSON entry per tensor).

    Only the quantized tensors go through torchao (it needs a module path in every name, which `query_tokens`
    lacks); one at a time, so the copies it makes never add up to a second model. Plain tensors are kept as they are.

    Raises:
        ValueError: a quantized type torchao cannot save (int4 on the CPU: quantize and export on a CUDA GPU).
    """
    import_torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name in list(state):
        tensor = state.pop(name)
        if not is_quantized(tensor):
            tensors[name] = tensor
            continue
        try:
            flat, meta = flatten_tensor_state_dict({name: tensor})
        except ValueError as err:
            raise ValueError(f"{name}: torchao cannot save this quantized weight ({err}); int4 models are exported "
                             "from a CUDA GPU, or use int8") from None
        tensors.update(flat)
        metadata[name] = meta[name]
    metadata["tensor_names"] = json.dumps(list(metadata))
    return tensors, metadata


def unflatten_quantized(tensors: dict[str, torch.Tensor], metadata: dict[str, str], mode: str, *,
                        device: torch.device | str, source: str) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_quantized`: the state dict with its quantized tensors rebuilt.

    Args:
        tensors: the plain tensors read from the files.
        metadata: the files' safetensors metadata.
        mode: the mode the files say they hold (config.json).
        device: where the model will run (int4 is stored in CUDA's tinygemm layout).
        source: the directory, for messages.

    Raises:
        ImportError: torchao is missing. ValueError: int4 for a device other than CUDA, or metadata that is not
            torchao's.
    """
    check_mode(mode)
    import_torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    if mode == "int4" and torch.device(device).type != "cuda":
        raise ValueError(f"{source}: its LLM is int4 in CUDA's tinygemm layout, which runs on a CUDA GPU only; "
                         "load it there, or export an int8 model for the CPU")
    if "tensor_names" not in metadata:
        raise ValueError(f"{source}: config.json says {CONFIG_ATTRIBUTE}={mode} but the safetensors files carry "
                         "no torchao metadata (written by another tool?): export the model again")
    restored, leftover = unflatten_tensor_state_dict(tensors, metadata)
    return {**restored, **leftover}
