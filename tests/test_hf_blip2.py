"""Hugging Face BLIP-2 directories as the vision-side source: single file, shards, .bin, the old separate q/v bias,
lazy shard reading (the LLM's shards are never opened), and clear errors for wrong sizes or files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerModel, Blip2VisionModel, OPTConfig

from minigpt4qwen.checkpoint.hf_blip2 import read_hf_blip2_vision
from minigpt4qwen.checkpoint.keymap import CheckpointError, load_checked
from minigpt4qwen.model.configs import tiny_qformer_config, tiny_vision_config

QUERIES = 8


def tiny_config() -> Blip2Config:
    opt = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    return Blip2Config(vision_config=tiny_vision_config().to_dict(), qformer_config=tiny_qformer_config().to_dict(),
                       text_config=opt.to_dict(), num_query_tokens=QUERIES)


@pytest.fixture(scope="module")
def hf_model() -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(tiny_config())
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # every tensor distinct, so a wrong pairing cannot pass
    return model


def vision_side(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def write_config(directory: Path, config: Blip2Config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(directory / "config.json"))


@pytest.mark.parametrize("shard_size", [None, "50KB"])
def test_save_pretrained_dirs_read_only_the_vision_side(hf_model, tmp_path: Path, shard_size: str | None) -> None:
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    state_dict, config = read_hf_blip2_vision(tmp_path, target=tiny_config())
    assert_same(state_dict, vision_side(hf_model))
    assert config.num_query_tokens == QUERIES and config.vision_config.hidden_size == 32
    vision = Blip2VisionModel(tiny_vision_config())
    target = nn.Module()
    target.vision_model, target.qformer = vision, Blip2QFormerModel(tiny_qformer_config())
    target.query_tokens = nn.Parameter(torch.zeros(1, QUERIES, 32))
    assert load_checked(target, state_dict, str(tmp_path)) == []  # complete and shape-correct


def test_llm_shards_are_never_opened(hf_model, tmp_path: Path) -> None:
    weights = hf_model.state_dict()
    vision = vision_side(hf_model)
    save_file({k: v.contiguous() for k, v in vision.items()}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"not read: holds only the OPT weights")
    weight_map = {k: "model-00001-of-00002.safetensors" if k in vision else "model-00002-of-00002.safetensors"
                  for k in weights}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_config(tmp_path, tiny_config())
    assert_same(read_hf_blip2_vision(tmp_path, target=tiny_config())[0], vision)


def test_pytorch_model_bin_and_legacy_separate_qv_bias(hf_model, tmp_path: Path) -> None:
    expected = vision_side(hf_model)
    legacy = dict(hf_model.state_dict())
    for i in range(tiny_vision_config().num_hidden_layers):
        prefix = f"vision_model.encoder.layers.{i}.self_attn."
        q_bias, k_bias, v_bias = legacy.pop(prefix + "qkv.bias").chunk(3)
        legacy[prefix + "q_bias"], legacy[prefix + "v_bias"] = q_bias, v_bias
        # The old layout had no key bias; it is zero after fusing (softmax is blind to it).
        expected[prefix + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(k_bias), v_bias])
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    write_config(tmp_path, tiny_config())
    assert_same(read_hf_blip2_vision(tmp_path, target=tiny_config())[0], expected)


def test_size_mismatch_with_target_is_reported(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path)
    eva = tiny_config()
    eva.vision_config.hidden_size = 1408
    with pytest.raises(CheckpointError, match=r"sizes differ.*vision_config\.hidden_size: 32 != 1408"):
        read_hf_blip2_vision(tmp_path, target=eva)
    assert read_hf_blip2_vision(tmp_path)[1].vision_config.hidden_size == 32  # no target: the directory's sizes
    other = tiny_config()
    other.num_query_tokens = 32
    with pytest.raises(CheckpointError, match=r"num_query_tokens: 8 != 32"):
        read_hf_blip2_vision(tmp_path, target=other)


def test_bad_directories(hf_model, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"empty: no config\.json"):
        read_hf_blip2_vision(tmp_path / "empty")
    write_config(tmp_path / "qwen", tiny_config())
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'qwen', expected 'blip-2'"):
        read_hf_blip2_vision(tmp_path / "qwen", target=tiny_config())
    write_config(tmp_path / "noweights", tiny_config())
    with pytest.raises(CheckpointError, match=r"noweights: no model\.safetensors"):
        read_hf_blip2_vision(tmp_path / "noweights", target=tiny_config())
    write_config(tmp_path / "corrupt", tiny_config())
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the safetensors file"):
        read_hf_blip2_vision(tmp_path / "corrupt", target=tiny_config())
