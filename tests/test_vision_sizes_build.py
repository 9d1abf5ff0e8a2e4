"""End to end with vision sides of two shapes each, in LAVIS and Hugging Face format: `build_model`, `chat
--cache-root` and `export` take the files' own sizes, and the export reloads (ours and plain transformers) with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    Qwen2ForCausalLM,
)

from minigpt4qwen.checkpoint.assemble import build_model
from minigpt4qwen.checkpoint.export import export_hf, load_exported
from minigpt4qwen.cli.main import main
from minigpt4qwen.config import ModelConfig
from minigpt4qwen.model.configs import tiny_qwen2_config
from minigpt4qwen.model.parts import PartDtypes
from minigpt4qwen.text.tiny_tokenizer import build_tiny_chat_tokenizer
from tests.conftest import CHAT_WORDS
from tests.test_vision_sizes import A, B, Shape, expected, lavis_blip2, lavis_eva, randn, sizes_of, write_lavis

LLM_WIDTH = 32


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 chat LLM directory with a word-level ChatML tokenizer (the vision side is what is tested)."""
    tokenizer = build_tiny_chat_tokenizer(CHAT_WORDS)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llm") / "qwen"
    Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=len(tokenizer), hidden_size=LLM_WIDTH)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_hf_blip2(directory: Path, s: Shape, vision_heads: int, qformer_heads: int, text_input: bool = False) -> Path:
    """A transformers BLIP-2 directory (tiny OPT LLM) of shape `s`, every tensor random."""
    vision = Blip2VisionConfig(hidden_size=s.width, intermediate_size=s.mlp, num_hidden_layers=s.depth,
                               num_attention_heads=vision_heads, image_size=s.image, patch_size=s.patch)
    qformer = Blip2QFormerConfig(hidden_size=s.qwidth, num_hidden_layers=s.qdepth, num_attention_heads=qformer_heads,
                                 intermediate_size=s.qmlp, cross_attention_frequency=s.freq,
                                 encoder_hidden_size=s.width, use_qformer_text_input=text_input)
    opt = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                                      text_config=opt.to_dict(), num_query_tokens=s.queries))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    model.save_pretrained(directory)
    return directory


def projection(path: Path, s: Shape) -> Path:
    """The original project's projection-only model.pth, for a Q-Former of width `s.qwidth`."""
    make = randn(7)
    torch.save({"llm_proj.weight": make((LLM_WIDTH, s.qwidth)) - 1.0, "llm_proj.bias": make((LLM_WIDTH,)) - 1.0}, path)
    return path


def heads(config: Blip2Config) -> tuple[int, int]:
    return config.vision_config.num_attention_heads, config.qformer_config.num_attention_heads


def assert_reloads_alike(model, tokenizer, out: Path, s: Shape) -> None:
    """export -> load_exported: same sizes, heads and image features; plain transformers reads the same sizes."""
    pixels = torch.randn(2, 3, s.image, s.image, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.encode_images(pixels)
    assert features.shape == (2, s.queries, LLM_WIDTH)
    export_hf(model, tokenizer, out)
    reloaded, _ = load_exported(out)
    assert sizes_of(reloaded.config) == expected(s) and heads(reloaded.config) == heads(model.config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_images(pixels), features)
    assert sizes_of(Blip2ForConditionalGeneration.from_pretrained(out).config) == expected(s)


@pytest.mark.parametrize(("shape", "arch", "expected_heads"), [(A, "tiny", (4, 4)), (B, "eva_vit_g", (16, 12))])
def test_lavis_files_build_with_their_own_sizes(qwen: Path, tmp_path: Path, shape: Shape, arch: str,
                                                expected_heads: tuple[int, int]) -> None:
    eva, blip2 = write_lavis(tmp_path / "lavis", shape)
    cfg = ModelConfig(llm=str(qwen), vision_weights=str(eva), qformer_weights=str(blip2), vision_arch=arch,
                      checkpoint=str(projection(tmp_path / "model.pth", shape)), dtypes=PartDtypes.uniform("fp32"))
    model, tokenizer = build_model(cfg, fresh_projection=False)
    assert sizes_of(model.config) == expected(shape) and heads(model.config) == expected_heads
    raw_eva, raw_blip2 = torch.load(eva, weights_only=True), torch.load(blip2, weights_only=True)["model"]
    assert torch.equal(model.vision_model.embeddings.position_embedding, raw_eva["pos_embed"].float())
    assert torch.equal(model.query_tokens, raw_blip2["query_tokens"])
    key = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    assert torch.equal(model.qformer.encoder.layer[0].crossattention.attention.key.weight, raw_blip2[key])
    assert_reloads_alike(model, tokenizer, tmp_path / "export", shape)


@pytest.mark.parametrize(("shape", "hf_heads"), [(A, (8, 8)), (B, (6, 3))])
def test_hf_directories_build_with_their_own_sizes_and_heads(qwen: Path, tmp_path: Path, shape: Shape,
                                                             hf_heads: tuple[int, int]) -> None:
    directory = save_hf_blip2(tmp_path / "blip2", shape, *hf_heads)
    cfg = ModelConfig(llm=str(qwen), vision_weights=str(directory), qformer_weights=str(directory),
                      dtypes=PartDtypes.uniform("fp32"))
    model, tokenizer = build_model(cfg)  # the preset's heads (16, 12) lose to the directory's config.json
    assert sizes_of(model.config) == expected(shape) and heads(model.config) == hf_heads
    ours = model.state_dict()
    for key, tensor in load_file(str(directory / "model.safetensors")).items():
        if key.startswith(("vision_model.", "qformer.", "query_tokens")):
            assert torch.equal(ours[key], tensor), key
    assert_reloads_alike(model, tokenizer, tmp_path / "export", shape)


def test_hf_qformer_text_branch_is_left_out(qwen: Path, tmp_path: Path) -> None:
    directory = save_hf_blip2(tmp_path / "itm", A, 4, 4, text_input=True)  # as blip2-itm-vit-g ships
    assert "qformer.encoder.layer.0.intermediate.dense.weight" in load_file(str(directory / "model.safetensors"))
    model, _ = build_model(ModelConfig(llm=str(qwen), vision_weights=str(directory), qformer_weights=str(directory)))
    assert not model.config.qformer_config.use_qformer_text_input and sizes_of(model.config) == expected(A)


def test_chat_finds_another_tower_in_the_original_cache_layout(qwen: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "cache" / "ckpt"
    eva, blip2 = write_lavis(tmp_path / "files", B)
    (ckpt / "eva").mkdir(parents=True)
    (ckpt / "blip2").mkdir()
    eva.rename(ckpt / "eva" / "eva_vit_g.pth")
    blip2.rename(ckpt / "blip2" / "blip2_pretrained_flant5xxl.pth")
    (ckpt / "Qwen7B-chat").symlink_to(qwen)
    Image.new("RGB", (50, 40), "red").save(tmp_path / "red.png")
    code = main(["chat", "--cache-root", str(tmp_path / "cache"), "-c", str(projection(tmp_path / "model.pth", B)),
                 "--cpu-only", "--max-new-tokens", "3", "--image", str(tmp_path / "red.png"), "--query", "what colour"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip(), captured.err


def test_export_cli_with_one_finetuned_instructblip_style_file(qwen: Path, tmp_path: Path) -> None:
    """A LAVIS file holding its own trained ViT (`visual_encoder.*`, as the 364 px fine-tuned BLIP-2 files do), an
    InstructBLIP head (`llm_proj`) and the Q-Former's text branch, named as both vision and Q-Former weights."""
    make = randn(3)
    state = lavis_blip2(B, make, heads=("llm_proj",)) | lavis_eva(B, make, prefix="visual_encoder.")
    torch.save({"model": state}, tmp_path / "blip2_finetuned.pth")
    yaml = tmp_path / "export.yaml"
    yaml.write_text(f"model:\n  llm: {qwen}\n  vision_weights: {tmp_path / 'blip2_finetuned.pth'}\n"
                    f"  qformer_weights: {tmp_path / 'blip2_finetuned.pth'}\n")
    assert main(["export", str(yaml), str(tmp_path / "out")]) == 2  # an export needs a trained projection
    # A projection trained for this LLM (the file's own head is another LLM's: 16 wide).
    torch.save({"llm_proj.weight": make((32, 24)), "llm_proj.bias": make((32,))}, tmp_path / "model.pth")
    assert main(["export", str(yaml), str(tmp_path / "out"), f"model.checkpoint={tmp_path / 'model.pth'}"]) == 0
    reloaded, _ = load_exported(tmp_path / "out")
    assert sizes_of(reloaded.config) == expected(B)
    assert torch.equal(reloaded.vision_model.embeddings.class_embedding,
                       state["visual_encoder.cls_token"].to(reloaded.vision_model.embeddings.class_embedding.dtype))


def test_data_check_and_train_take_the_sizes_from_the_weights(qwen: Path, tmp_path: Path, capsys) -> None:
    eva, blip2 = write_lavis(tmp_path, B)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    records = [{"image": "red.png", "instruction": "<Img><ImageHere></Img> what colour is the shape", "output": "red"}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    config = {"model": {"llm": str(qwen), "vision_weights": str(eva), "qformer_weights": str(blip2)},
              "data": {"datasets": [{"format": "minigpt4qwen", "annotation": str(tmp_path / "train.json"),
                                     "image_root": str(tmp_path)}], "num_workers": 0},
              "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "output_dir": str(tmp_path / "run"),
                        "check_memory": False, "progress_bar": False, "tensorboard": False, "precision": "fp32"}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "check", str(tmp_path / "train.yaml")]) == 0  # the query count: 6, from blip2's file
    assert main(["train", str(tmp_path / "train.yaml")]) == 2  # data.image_size is still the default 224
    assert "the vision tower takes 32 px images but data.image_size is 224" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "train.yaml"), "data.image_size=32"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in metrics)
