"""Float8 matmuls in the LLM's blocks (`model.float8`, torchao float8 training): which layers convert, the refusals,
and projection-only training whose loss and projection gradient track the full-precision run.

torch 2.13's CPU `_scaled_mm` takes fp8 operands, so the real float8 path (torchao's casts, scales and fp8 matmuls,
only not fast) runs here through `allow_cpu`, the CPU hook of `check_float8_support`.
"""

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from minigpt4qwen.config import load_config  # noqa: E402
from minigpt4qwen.model import float8  # noqa: E402
from minigpt4qwen.model.configs import (  # noqa: E402
    minigpt4qwen_config,
    tiny_qformer_config,
    tiny_qwen2_config,
    tiny_vision_config,
)
from minigpt4qwen.model.float8 import apply_float8, check_float8_support, float8_targets  # noqa: E402
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen  # noqa: E402
from minigpt4qwen.model.parts import PartDtypes, TrainableParts  # noqa: E402
from minigpt4qwen.training.config import LoraConfig, RunConfig  # noqa: E402
from tests.conftest import NUM_QUERIES, make_tiny_model  # noqa: E402
from tests.test_cli_train import project  # noqa: E402, F401 (a fixture)

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def converted(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}


def test_config_key_parses_and_is_refused_with_quantized_weights(project):  # noqa: F811
    def run_config(*overrides: str) -> RunConfig:
        return load_config(project / "train.yaml", list(overrides), RunConfig)

    assert run_config().model.float8 is False
    assert run_config("model.float8=true").model.float8 is True
    with pytest.raises(ValueError, match="model.float8"):
        run_config("model.float8=fast")
    for engine in (["parallel.engine=pipeline"], ["parallel.engine=deepspeed", "parallel.zero_stage=3"], []):
        run_config("model.float8=true", *engine).validate()
    with pytest.raises(ValueError, match="model.float8=false or model.quantize=null"):
        run_config("model.float8=true", "model.quantize=int8").validate()


def test_exactly_the_llm_block_linears_are_converted():
    model = make_tiny_model()  # every Linear here (ViT, Q-Former, projection, head) is 32 or 64 wide
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(m.in_features % 16 == 0 and m.out_features % 16 == 0 for m in linears)
    assert apply_float8(model, allow_cpu=True) == 14
    assert converted(model) == {f"language_model.model.layers.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS}
    # A 72-wide MLP cannot go to the fp8 GEMM: only the attention projections convert.
    text = tiny_qwen2_config(vocab_size=64)
    text.intermediate_size = 72
    odd = MiniGPT4Qwen(minigpt4qwen_config(text, image_token_id=5, vision_config=tiny_vision_config(),
                                           qformer_config=tiny_qformer_config(), num_query_tokens=NUM_QUERIES))
    want = [f"{i}.{n}" for i in range(2) for n in sorted(BLOCK_LINEARS[:4])]
    assert sorted(float8_targets(odd.language_model)) == want
    with pytest.raises(ValueError, match="no Linear layer in the LLM's blocks is left to convert"):
        apply_float8(model, allow_cpu=True)  # a second call finds nothing left


def test_lora_adapters_stay_in_high_precision():
    from minigpt4qwen.training.lora import apply_lora

    model = make_tiny_model()
    model.set_trainable(TrainableParts())
    apply_lora(model, LoraConfig(enabled=True, r=16))  # 32 -> 16 -> 32 adapters: fp8-sized, still skipped
    assert apply_float8(model, allow_cpu=True) == 14
    names = converted(model)
    assert all(n.endswith(".base_layer") for n in names) and len(names) == 14
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.language_model.named_parameters())


def test_refusals_say_what_is_needed(monkeypatch):
    model = make_tiny_model()
    with pytest.raises(RuntimeError, match=r"Ada or Hopper GPU \(CUDA compute capability 8.9\+.*minigpt4qwen\[quant\]"
                                           r".*trains on cpu: set model.float8=false"):
        apply_float8(model)
    assert converted(model) == set()
    # On CUDA, the card's compute capability decides (faked here: no GPU on the test machine).
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(RuntimeError, match="RTX 3090 is sm_86"):
        check_float8_support(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_support(torch.device("cuda:0"))  # Hopper
    from minigpt4qwen.model.quantization import quantize_language_model

    model.set_trainable(TrainableParts())
    quantize_language_model(model, "int8")
    with pytest.raises(ValueError, match="weights are quantized"):
        apply_float8(model, allow_cpu=True)


def batch(model: MiniGPT4Qwen, rows: int = 3, length: int = 21) -> dict[str, torch.Tensor]:
    """Random text with one image per row (21 tokens: 63 in all, not a multiple of 16, as padding must handle)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(model.image_token_id + 1, 64, (rows, length), generator=g)
    ids[:, 2 : 2 + NUM_QUERIES] = model.image_token_id
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(rows, 3, 28, 28, generator=g)}


def loss_and_gradient(model: MiniGPT4Qwen, data: dict, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**data).loss
    loss.backward()
    return loss.item(), model.language_projection.weight.grad.clone()


@pytest.mark.parametrize("llm_dtype", ["fp32", "bf16"])
def test_projection_gradient_through_a_float8_llm_tracks_full_precision(llm_dtype, monkeypatch):
    reference = make_tiny_model()
    reference.set_trainable(TrainableParts())  # the published recipe: only the projection trains
    reference.cast_parts(PartDtypes("fp32", "fp32", "fp32", "fp32", llm_dtype))
    model = copy.deepcopy(reference)
    apply_float8(model, allow_cpu=True)
    calls = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    data, autocast = batch(model), llm_dtype == "bf16"  # bf16: as on the GPU, under bf16 autocast
    want_loss, want_grad = loss_and_gradient(reference, data, autocast)
    assert not calls
    loss, grad = loss_and_gradient(model, data, autocast)
    # Forward and gradient to the input in fp8, and torchao 0.18 also computes the frozen weights' gradient: three
    # fp8 matmuls per layer (when this fails, torchao skips the wasted one: update model/float8.py's docstring).
    assert len(calls) == 3 * 14
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"language_projection.weight",
                                                                                "language_projection.bias"}
    # The loss is a smooth function of the logits (|d loss| <= 2 max |d logit|): e4m3's rounding (2^-4 at most,
    # ~3.6% RMS per element) moves this tiny model's logits by far less than 1% of its loss.
    assert abs(loss - want_loss) < 0.01 * want_loss
    # Gradients are cast to e5m2 (2 mantissa bits: 12.5% at most, ~7% RMS per element) at each of the 14 layers'
    # input-gradient matmuls, the weights and activations to e4m3; the residual stream carries part of the gradient
    # past each block unrounded. Measured ~8-9% relative (cosine 0.996); 20% leaves room for torchao's scaling
    # choices while a wrong scale or a dropped path (errors ~100%) fails.
    error = float((grad - want_grad).norm() / want_grad.norm())
    assert 0 < error < 0.2, error
    assert torch.nn.functional.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) > 0.97


def test_training_converts_before_compiling_and_refuses_the_cpu(project, tmp_path, monkeypatch):  # noqa: F811
    from minigpt4qwen.checkpoint import assemble
    from minigpt4qwen.training import entry

    def never_loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded before the device was checked")

    monkeypatch.setattr(assemble, "build_model", never_loaded)
    with pytest.raises(RuntimeError, match="model.float8 needs an Ada or Hopper GPU"):
        entry.train_main(str(project / "train.yaml"), [f"train.output_dir={tmp_path / 'cpu'}", "model.float8=true"])
    monkeypatch.undo()

    seen = {}
    runtime_options = assemble.apply_runtime_options

    def recording(model, cfg):  # where checkpointing and compile_blocks are applied
        seen["converted"] = converted(model)
        runtime_options(model, cfg)

    def cpu_allowed(device: torch.device, **_) -> None:
        check_float8_support(device, allow_cpu=True)

    monkeypatch.setattr(float8, "check_float8_support", cpu_allowed)
    monkeypatch.setattr(assemble, "apply_runtime_options", recording)
    result = entry.train_main(str(project / "train.yaml"), [f"train.output_dir={tmp_path / 'fp8'}", "model.float8=true",
                                                            "train.max_steps=2", "train.resume=none"])
    # The project's LLM is 64 wide with an 88-wide MLP: its one block converts the attention projections only.
    assert seen["converted"] == {f"language_model.model.layers.0.self_attn.{n}_proj" for n in "qkvo"}
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
