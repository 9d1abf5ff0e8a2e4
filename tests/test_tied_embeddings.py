"""LLMs whose output head is tied to their input embeddings (Qwen2.5-0.5B..3B, Qwen3 <= 4B, OPT) round-trip through
exports, native checkpoints and DeepSpeed conversions with identical logits, and come back tied."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration

from minigpt4qwen.checkpoint.deepspeed_convert import MODEL_STATES, convert_to_native
from minigpt4qwen.checkpoint.export import export_hf, load_exported
from minigpt4qwen.checkpoint.keymap import CheckpointError, load_checked
from minigpt4qwen.checkpoint.native import read_native_checkpoint, read_native_meta, save_checkpoint
from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.parts import TrainableParts
from tests.test_export import EXTRA_0, _inputs, qwen_tokenizer  # noqa: F401 (qwen_tokenizer: a fixture)

EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"


def tied_config():
    text = tiny_qwen2_config(vocab_size=151936)
    text.tie_word_embeddings = True
    return minigpt4qwen_config(text, image_token_id=EXTRA_0, vision_config=tiny_vision_config(),
                               qformer_config=tiny_qformer_config(), num_query_tokens=4)


def is_tied(model: MiniGPT4Qwen) -> bool:
    return model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def logits(model: MiniGPT4Qwen) -> torch.Tensor:
    ids, mask, px = _inputs()
    with torch.no_grad():
        return model(ids, mask, pixel_values=px).logits


@pytest.fixture(scope="module")
def model() -> MiniGPT4Qwen:
    torch.manual_seed(0)
    model = MiniGPT4Qwen(tied_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # the tied weight once
            p.add_(torch.randn_like(p) * 0.05)
    assert is_tied(model)
    return model


@pytest.fixture(scope="module")
def exported(model, qwen_tokenizer, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("tied") / "export"
    export_hf(model, qwen_tokenizer, out, max_shard_size="2MB")
    return out


def test_export_stores_the_tied_weight_once_and_reloads_tied(model, exported):
    stored = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert EMBED in stored and HEAD not in stored  # as transformers' own saves of tied models
    reloaded, _ = load_exported(exported)
    assert is_tied(reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_plain_transformers_loads_the_tied_export(model, exported):
    plain = Blip2ForConditionalGeneration.from_pretrained(exported).eval()
    plain.vision_model.post_layernorm.eps = 1e-5  # the one value Blip2Config cannot hold (see test_export)
    ids, mask, px = _inputs()
    with torch.no_grad():
        got = plain(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, logits(model), rtol=1e-5, atol=1e-5)


def _single_file_copy(exported, target, rename: dict[str, str | None]):
    """The export with its weights in one file, keys renamed (None: dropped)."""
    target.mkdir()
    tensors = {}
    for f in exported.iterdir():
        if f.name.startswith("model"):
            if f.suffix == ".safetensors":
                tensors.update(load_file(f))
        else:
            (target / f.name).write_bytes(f.read_bytes())
    for old, new in rename.items():
        value = tensors.pop(old)
        if new is not None:
            tensors[new] = value
    save_file(tensors, target / "model.safetensors")
    return target


def test_an_export_storing_only_the_head_loads_tied(model, exported, tmp_path):
    # What exports written before this fix hold: huggingface_hub kept the head's name for the shared tensor.
    reloaded, _ = load_exported(_single_file_copy(exported, tmp_path / "head", {EMBED: HEAD}))
    assert is_tied(reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_an_export_lacking_both_tied_keys_is_still_an_error(exported, tmp_path):
    broken = _single_file_copy(exported, tmp_path / "none", {EMBED: None})
    with pytest.raises(CheckpointError, match=rf"{broken}: .*missing key\(s\): '{EMBED}'"):
        load_exported(broken)


@pytest.mark.parametrize("which", ["all", "trainable"])
def test_native_checkpoint_round_trips_exactly_and_stays_tied(model, tmp_path, which):
    model.set_trainable(TrainableParts.all())  # every part trainable: the tied weight is in both selections
    save_checkpoint(model, tmp_path / "ckpt", which=which)
    assert read_native_meta(tmp_path / "ckpt")["tied"] == {HEAD: EMBED}
    tensors = read_native_checkpoint(tmp_path / "ckpt")
    state = model.state_dict()
    assert set(tensors) == set(state)
    for key, value in state.items():
        assert torch.equal(tensors[key], value), key
    assert tensors[HEAD] is tensors[EMBED]
    torch.manual_seed(1)
    fresh = MiniGPT4Qwen(tied_config()).eval()
    load_checked(fresh, tensors, source=str(tmp_path / "ckpt"))
    assert is_tied(fresh)
    assert torch.equal(logits(fresh), logits(model))


def test_native_checkpoint_missing_the_stored_tied_key_names_it(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", which="all")
    weights = tmp_path / "ckpt" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != EMBED}, weights)
    with pytest.raises(CheckpointError, match=rf"{weights}: key '{EMBED}' is missing, .* tied '{HEAD}'"):
        read_native_checkpoint(tmp_path / "ckpt")


def test_deepspeed_checkpoint_with_tied_weights_converts(model, tmp_path):
    # DeepSpeed's readers give tied weights as one tensor (its ZeRO-0 module states, zero_to_fp32's shared_params).
    tag = tmp_path / "run" / "checkpoint-00000002"
    tag.mkdir(parents=True)
    module = {k: v.clone() for k, v in model.state_dict().items() if k != HEAD}
    module[HEAD] = module[EMBED]
    torch.save({"module": module}, tag / MODEL_STATES)
    converted = read_native_checkpoint(convert_to_native(tag, tmp_path / "native"))
    assert converted[HEAD] is converted[EMBED]
    assert set(converted) == set(module)
    for key, value in module.items():
        assert torch.equal(converted[key], value), key
