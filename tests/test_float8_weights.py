"""Frozen LLM weights stored in float8 (`model.float8_weights`): bitwise the matmuls of `model.float8` (its per-step
cast of a frozen weight gives the stored bits), half the weights' bytes, adapters still training, the refusals, a
training run equal to `model.float8`'s loss for loss, and 2 DDP processes equal to one (the `__main__` block below
is the torchrun worker). Runs on the CPU through `allow_cpu` (torch's CPU fp8 matmul), as tests/test_float8.py
does."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from minigpt4qwen.config import load_config  # noqa: E402
from minigpt4qwen.model import float8, float8_weights  # noqa: E402
from minigpt4qwen.model.float8 import apply_float8, check_float8_support  # noqa: E402
from minigpt4qwen.model.float8_weights import (  # noqa: E402
    Float8WeightLinear,
    float8_weight_buffer_names,
    store_float8_weights,
    store_loaded_weights_in_float8,
)
from minigpt4qwen.model.parts import PartDtypes, TrainableParts  # noqa: E402
from minigpt4qwen.training.config import LoraConfig, RunConfig  # noqa: E402
from minigpt4qwen.training.memory import estimate_memory  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.test_cli_train import project  # noqa: E402, F401 (a fixture)
from tests.test_float8 import batch, loss_and_gradient  # noqa: E402


def float8_pair(llm_dtype: str):
    """A tiny model under `model.float8` and a copy of it with its frozen weights stored in float8."""
    model = make_tiny_model()
    model.set_trainable(TrainableParts())
    model.cast_parts(PartDtypes("fp32", "fp32", "fp32", "fp32", llm_dtype))
    apply_float8(model, allow_cpu=True)
    stored = copy.deepcopy(model)
    assert store_float8_weights(stored.language_model) == 14
    return model, stored


@pytest.mark.parametrize("llm_dtype", ["fp32", "bf16"])
def test_same_loss_and_gradients_as_casting_every_step_in_half_the_bytes(llm_dtype):
    model, stored = float8_pair(llm_dtype)
    data = batch(model)
    want_loss, want_grad = loss_and_gradient(model, data, autocast=llm_dtype == "bf16")
    loss, grad = loss_and_gradient(stored, data, autocast=llm_dtype == "bf16")
    assert loss == want_loss and torch.equal(grad, want_grad)  # the same e4m3 bits, the same fp8 matmuls

    def block_bytes(llm) -> int:
        tensors = [*llm.model.layers.parameters(), *llm.model.layers.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    layers = stored.language_model.model.layers
    biases_and_norms = sum(p.numel() * p.element_size() for p in layers.parameters())
    width = 1 if llm_dtype == "bf16" else 3  # bf16 -> 1 byte per weight; fp32 -> 1 (4 bytes before: 3 saved)
    saved = block_bytes(model.language_model) - block_bytes(stored.language_model)
    weights = sum(m.in_features * m.out_features for m in stored.modules() if isinstance(m, Float8WeightLinear))
    assert saved == weights * width - 4 * 14  # less one fp32 scale per layer
    assert biases_and_norms < weights  # what stays a parameter: biases and norms
    assert not any(n.endswith("proj.weight") for n, _ in layers.named_parameters())


def test_lora_adapters_train_over_float8_weights():
    from minigpt4qwen.training.lora import apply_lora

    model = make_tiny_model()
    model.set_trainable(TrainableParts())
    apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    apply_float8(model, allow_cpu=True)
    stored = copy.deepcopy(model)
    assert store_float8_weights(stored.language_model) == 14  # the adapters' base layers included
    data = batch(model)
    for m in (model, stored):
        torch.manual_seed(0)
        for name, p in m.named_parameters():
            if "lora_B" in name:  # LoRA starts at zero; make the adapters' gradients depend on the base path
                torch.nn.init.normal_(p, std=0.1)
    want = loss_and_gradient(model, data, autocast=False)
    got = loss_and_gradient(stored, data, autocast=False)
    assert want[0] == got[0] and torch.equal(want[1], got[1])
    grads = {n for n, p in stored.named_parameters() if p.grad is not None}
    assert {n for n in grads if "lora_" in n} and all("lora_" in n or "language_projection" in n for n in grads)


def test_what_ddp_skips_and_the_memory_estimate_counts():
    model, stored = float8_pair("bf16")
    names = float8_weight_buffer_names(stored)
    assert len(names) == 28 and dict(stored.named_buffers()).keys() >= set(names)
    assert float8_weight_buffer_names(model) == []
    args = {"micro_batch_size": 2, "max_length": 64, "activation_bytes": 2, "checkpointed_llm": False,
            "device": torch.device("cpu")}
    fp8_bytes = sum(m.weight_bits.numel() for m in stored.modules() if isinstance(m, Float8WeightLinear))
    assert estimate_memory(model, **args).weights - estimate_memory(stored, **args).weights == fp8_bytes - 4 * 14


def test_config_refusals_say_what_to_set(project):  # noqa: F811
    def validated(*overrides: str) -> RunConfig:
        cfg = load_config(project / "train.yaml", list(overrides), RunConfig)
        cfg.validate()
        return cfg

    assert validated("model.float8=true", "model.float8_weights=true").model.float8_weights is True
    refusals = {
        "set model.float8=true": ["model.float8=false"],
        "model.trainable.language_model=false": ["model.trainable.language_model=true"],
        "parallel.engine=ddp": ["parallel.engine=deepspeed"],
        "train.save_contents=trainable": ["train.save_contents=all"],
    }
    for message, overrides in refusals.items():
        with pytest.raises(ValueError, match=message):
            validated("model.float8=true", "model.float8_weights=true", *overrides)


def recorded(monkeypatch, name: str) -> list[int]:
    """What each call of `float8_weights.<name>` returned (how many layers it stored), the calls still made."""
    original, calls = getattr(float8_weights, name), []

    def recording(language_model, device=None) -> int:
        calls.append(original(language_model, device))
        return calls[-1]

    monkeypatch.setattr(float8_weights, name, recording)
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_training_runs_loss_for_loss_as_model_float8(project, tmp_path, monkeypatch, lora):  # noqa: F811
    from minigpt4qwen.training import entry

    def cpu_allowed(device: torch.device, **_) -> None:
        check_float8_support(device, allow_cpu=True)

    monkeypatch.setattr(float8, "check_float8_support", cpu_allowed)
    common = ["model.float8=true", "train.max_steps=3", "train.resume=none", f"train.lora.enabled={lora}",
              "train.lora.target_modules=[q_proj,v_proj]"]
    cast = entry.train_main(str(project / "train.yaml"), [f"train.output_dir={tmp_path / 'cast'}", *common])
    while_loading = recorded(monkeypatch, "store_loaded_weights_in_float8")
    after_lora = recorded(monkeypatch, "store_float8_weights")
    stored = entry.train_main(str(project / "train.yaml"), [f"train.output_dir={tmp_path / 'stored'}", *common,
                                                            "model.float8_weights=true"])
    # The project's LLM: one block in two shards, its 88-wide MLP left in bf16. Without LoRA its weights were
    # stored while each shard loaded (the last call finds nothing left); LoRA wraps the bf16 Linears first.
    assert (sum(while_loading), sum(after_lora)) == ((0, 4) if lora else (4, 0))
    assert lora or len(while_loading) == 3 and while_loading[-1] == 0
    assert len(stored.losses) == 3 and all(math.isfinite(x) for x in stored.losses)
    assert stored.losses == cast.losses


def test_a_qwen1_directory_streams_into_float8_weights_with_the_bits_of_a_whole_load(tmp_path, monkeypatch):
    from torchao.float8 import convert_to_float8_training

    from minigpt4qwen.checkpoint import qwen1
    from minigpt4qwen.checkpoint.llm import load_llm
    from minigpt4qwen.model.activation_checkpointing import decoder_layers
    from tests.test_qwen1 import random_qwen1_weights, tiny_config, write_qwen1_dir

    qwen = tiny_config(hidden=128, layers=2, ffn=512)
    weights = random_qwen1_weights(qwen)
    order = sorted(weights, key=lambda k: ".h.1." in k)  # shards: [embeddings], [layer 0, norm, head], [layer 1]
    write_qwen1_dir(tmp_path, qwen, {k: weights[k] for k in order}, shards=3)
    reference, _ = load_llm(tmp_path, dtype=torch.bfloat16)  # whole, then converted as `model.float8` + storing
    reference.requires_grad_(False)
    convert_to_float8_training(decoder_layers(reference), config=float8.float8_recipe())
    assert store_float8_weights(reference) == 14

    def bf16_targets(llm) -> list[str]:
        return [n for n, m in float8.float8_targets(llm).items() if not m.weight.is_meta]

    unstored_at_each_shard = []
    original_load = qwen1.load_checked

    def checking(model, tensors, *args, **kwargs):
        unstored_at_each_shard.append(bf16_targets(model))
        return original_load(model, tensors, *args, **kwargs)

    monkeypatch.setattr(qwen1, "load_checked", checking)
    calls = recorded(monkeypatch, "store_loaded_weights_in_float8")
    streamed, _ = load_llm(tmp_path, dtype=torch.bfloat16, float8_weights=True)
    assert calls == [0, 7, 7]  # each shard's layers stored as it arrived
    assert unstored_at_each_shard == [[], [], []]  # no bf16 block weight was ever left while the next shard loaded
    pairs = [(a, b) for a, b in zip(reference.modules(), streamed.modules()) if isinstance(a, Float8WeightLinear)]
    assert len(pairs) == 14 and all(type(b) is Float8WeightLinear for _, b in pairs)
    for a, b in pairs:
        assert torch.equal(a.weight_bits, b.weight_bits) and torch.equal(a.weight_scale, b.weight_scale)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)


def test_ddp_does_not_broadcast_the_float8_weights(tmp_path):
    import gc

    from minigpt4qwen.training.distributed import DistInfo, wrap_ddp

    _, stored = float8_pair("fp32")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = wrap_ddp(stored, DistInfo(world_size=2))
        # Each rank casts its own loaded weights alike; DDP would otherwise broadcast them with every forward.
        assert set(float8_weight_buffer_names(stored)) <= set(wrapped.parameters_to_ignore)
        wrapped(**batch(stored)).loss.backward()
    finally:
        wrapped = None  # DDP's reducer goes before its process group (see distributed.destroy)
        gc.collect()
        torch.distributed.destroy_process_group()
    assert stored.language_projection.weight.grad.abs().sum() > 0


def test_dtype_casts_keep_the_bits_and_the_fp32_scale():
    _, stored = float8_pair("bf16")
    layer = stored.language_model.model.layers[0].self_attn.o_proj  # no bias: only the stored weight computes
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = layer(x)
    layer.half()  # what a careless cast after storing would do: `_scaled_mm` refuses a half scale
    assert layer.weight_bits.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer(x), want)


def test_other_float8_recipes_are_refused():
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    model = make_tiny_model()
    model.language_model.requires_grad_(False)
    convert_to_float8_training(model.language_model.model.layers, config=Float8LinearConfig.from_recipe_name("rowwise"))
    with pytest.raises(ValueError, match="one per-tensor cast of each weight"):
        store_float8_weights(model.language_model)


def test_the_memory_check_counts_a_model_already_on_the_device_as_available():
    from minigpt4qwen.training.memory import available_memory

    model, _ = float8_pair("bf16")
    estimate = estimate_memory(model, micro_batch_size=1, max_length=8, activation_bytes=2, checkpointed_llm=False,
                               device=torch.device("cpu"))
    # The model is on the host already: its bytes are in the estimate and no longer in MemAvailable.
    assert estimate.available - available_memory(torch.device("cpu")) == pytest.approx(estimate.weights, rel=0.05,
                                                                                          abs=2**24)


def float8_stored_tiny() -> torch.nn.Module:
    """tests/test_trainer.py's tiny model (dropout off, the projection trained), its LLM weights stored in float8."""
    from tests.test_trainer import tiny

    model = tiny(TrainableParts())
    apply_float8(model, allow_cpu=True)
    assert store_float8_weights(model.language_model) == 14
    return model


def test_two_ddp_processes_train_as_one(tmp_path):
    from tests.test_deepspeed import launch
    from tests.test_packing import STEPS, packed_trainer
    from tests.test_trainer import trainable

    launch("tests.test_float8_weights", tmp_path / "dist")
    losses, weights = torch.load(tmp_path / "dist" / "results.pt")
    model = float8_stored_tiny()
    reference = packed_trainer(tmp_path / "one", model, max_steps=STEPS, micro_batch_size=2, grad_accum=4).fit()
    assert losses == pytest.approx(reference.losses, rel=1e-5)
    for key, value in trainable(model).items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _worker(out: Path) -> None:
    from minigpt4qwen.training.distributed import DistInfo, destroy, init_distributed
    from tests.test_packing import ddp_packed_fit

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    info = DistInfo(rank=info.rank, world_size=info.world_size)
    result = ddp_packed_fit(out / "ddp", float8_stored_tiny(), info)
    if info.is_main:
        torch.save(result, out / "results.pt")
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_a_native_directory_reaches_float8_weights_one_layer_at_a_time(tmp_path, monkeypatch):
    from minigpt4qwen.checkpoint.llm import load_llm
    from tests.llm_families import write_llm_dir

    write_llm_dir("Qwen3-8B", tmp_path / "qwen3")
    reference, _ = load_llm(tmp_path / "qwen3", dtype=torch.bfloat16)
    calls = recorded(monkeypatch, "store_loaded_weights_in_float8")
    llm, _ = load_llm(tmp_path / "qwen3", dtype=torch.bfloat16, float8_weights=True)
    # transformers' loader has no per-shard hook: read whole on the host, stored in one pass, layer by layer.
    assert calls == [len(float8.float8_targets(reference))] and calls[0] > 0
    reference.requires_grad_(False)
    assert store_loaded_weights_in_float8(reference) == calls[0]
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, reference(ids).logits)
