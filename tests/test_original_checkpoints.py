"""The original MiniGPT4Qwen checkpoint layouts: 7B/14B manifests fully covered on meta, tiny files of every layout
read into the right composite names with equal tensors, and errors for unknown or incomplete layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel, Qwen2ForCausalLM

from minigpt4qwen.checkpoint.keymap import CheckpointError, check_state_dict
from minigpt4qwen.checkpoint.original import detect_original_layout, original_keymap, read_original_checkpoint
from minigpt4qwen.checkpoint.qwen1 import qwen2_config_from_qwen1
from minigpt4qwen.model.configs import blip2_qformer_config, eva_vit_g_config, tiny_qformer_config, tiny_vision_config
from minigpt4qwen.model.parts import PART_NAMES
from tests.reference import MANIFESTS
from tests.test_lavis_checkpoints import QUERIES, QW, holder, meta_tensors, tiny_blip2_model, tiny_eva_state_dict

H, LAYERS, VOCAB, FFN = 32, 3, 64, 48
QWEN1_TINY = {"hidden_size": H, "num_attention_heads": 4, "num_hidden_layers": LAYERS, "intermediate_size": 2 * FFN,
              "vocab_size": VOCAB}
# Text-branch keys MiniGPT4Qwen deleted from its Q-Former, and the T5 head: absent from its own checkpoints.
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
_NOT_IN_MINIGPT4QWEN = re.compile(r"t5_proj|Qformer\.cls|word_embeddings|\.layer\.\d+\.(intermediate|output)\.")


def composite_on_meta(vision_config, qformer_config, queries: int, qwen1_config: dict) -> nn.Module:
    with torch.device("meta"):
        language_model = Qwen2ForCausalLM(qwen2_config_from_qwen1(qwen1_config))
        return holder(vision_model=Blip2VisionModel(vision_config),
                      query_tokens=nn.Parameter(torch.empty(1, queries, qformer_config.hidden_size)),
                      qformer=Blip2QFormerModel(qformer_config),
                      language_projection=nn.Linear(qformer_config.hidden_size, language_model.config.hidden_size),
                      language_model=language_model)


@pytest.mark.parametrize("size", ["7b", "14b"])
def test_full_state_dict_manifest_covers_the_whole_composite_model(size: str) -> None:
    manifest = json.loads((MANIFESTS / f"minigpt4qwen_{size}_full_state_dict.json").read_text())
    source = meta_tensors(manifest["state_dict"])
    qwen1_config = json.loads((MANIFESTS / f"qwen{size}_chat.json").read_text())["config"]
    converted = original_keymap().convert(source, source=f"{size} manifest")
    target = composite_on_meta(eva_vit_g_config(), blip2_qformer_config(), 32, qwen1_config)
    assert check_state_dict(target, converted, f"{size} manifest") == []  # nothing missing, unexpected or misshapen


# ----------------------------------------------------------------------------------------------- tiny layouts
def tiny_qwen1(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A Qwen1 (remote code) LLM as MiniGPT4Qwen saves it, under `llm_model.`."""
    t = "llm_model.transformer."
    sd = {f"{t}wte.weight": torch.randn(VOCAB, H, generator=gen), f"{t}ln_f.weight": torch.randn(H, generator=gen),
          "llm_model.lm_head.weight": torch.randn(VOCAB, H, generator=gen)}
    for i in range(LAYERS):
        shapes = {"ln_1.weight": (H,), "attn.c_attn.weight": (3 * H, H), "attn.c_attn.bias": (3 * H,),
                  "attn.c_proj.weight": (H, H), "ln_2.weight": (H,), "mlp.w1.weight": (FFN, H),
                  "mlp.w2.weight": (FFN, H), "mlp.c_proj.weight": (H, FFN)}
        sd.update({f"{t}h.{i}.{k}": torch.randn(s, generator=gen) for k, s in shapes.items()})
    return sd


@pytest.fixture(scope="module")
def raw() -> dict[str, torch.Tensor]:
    """The full original state dict in its own names (what deepspeed2pth.py writes)."""
    gen = torch.Generator().manual_seed(0)
    vision = {f"visual_encoder.{k}": v for k, v in tiny_eva_state_dict(gen).items()}
    blip2 = {k: v for k, v in tiny_blip2_model(gen).items() if not _NOT_IN_MINIGPT4QWEN.search(k)}
    projection = {"llm_proj.weight": torch.randn(H, QW, generator=gen), "llm_proj.bias": torch.randn(H, generator=gen)}
    return {**vision, **blip2, **projection, **tiny_qwen1(gen)}


def subset(raw: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in raw.items() if k.startswith(prefixes)}


def assert_mapped(sd: dict[str, torch.Tensor], raw: dict[str, torch.Tensor]) -> None:
    """Spot checks, written out by hand, of where each kind of original tensor must land (for present parts)."""
    expected = {}
    if "llm_proj.weight" in raw:
        expected["language_projection.weight"] = raw["llm_proj.weight"]
    if "visual_encoder.cls_token" in raw:
        q, v = raw["visual_encoder.blocks.1.attn.q_bias"], raw["visual_encoder.blocks.1.attn.v_bias"]
        expected.update({
            "vision_model.embeddings.class_embedding": raw["visual_encoder.cls_token"],
            "vision_model.encoder.layers.1.self_attn.qkv.bias": torch.cat([q, torch.zeros_like(q), v]),
            "vision_model.encoder.layers.1.mlp.fc2.weight": raw["visual_encoder.blocks.1.mlp.fc2.weight"],
            "vision_model.post_layernorm.bias": raw["ln_vision.bias"],
            "query_tokens": raw["query_tokens"],
            "qformer.layernorm.weight": raw["Qformer.bert.embeddings.LayerNorm.weight"],
            "qformer.encoder.layer.0.crossattention.attention.key.weight":
                raw["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
            "qformer.encoder.layer.1.output_query.LayerNorm.bias":
                raw["Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"],
        })
    if "llm_model.lm_head.weight" in raw:
        h2 = "llm_model.transformer.h.2."
        expected.update({
            "language_model.model.embed_tokens.weight": raw["llm_model.transformer.wte.weight"],
            "language_model.model.layers.2.self_attn.k_proj.weight": raw[h2 + "attn.c_attn.weight"][H:2 * H],
            "language_model.model.layers.2.self_attn.v_proj.bias": raw[h2 + "attn.c_attn.bias"][2 * H:],
            "language_model.model.layers.2.mlp.up_proj.weight": raw[h2 + "mlp.w1.weight"],
            "language_model.model.layers.2.mlp.gate_proj.weight": raw[h2 + "mlp.w2.weight"],
            "language_model.model.layers.2.post_attention_layernorm.weight": raw[h2 + "ln_2.weight"],
            "language_model.model.norm.weight": raw["llm_model.transformer.ln_f.weight"],
            "language_model.lm_head.weight": raw["llm_model.lm_head.weight"],
        })
    for key, tensor in expected.items():
        assert torch.equal(sd[key], tensor), key


@pytest.mark.parametrize(
    ("name", "prefixes", "runner", "layout"),
    [
        ("model.pth", ("llm_proj.",), False, "flat:language_projection"),
        ("full_model.pth", ("",), False, "flat:" + "+".join(PART_NAMES)),
        ("unfreeze_llm_model.pth", ("llm_proj.", "llm_model."), False, "flat:language_projection+language_model"),
        ("checkpoint_3.pth", ("llm_proj.", POSITION_IDS), True, "runner:language_projection"),
        ("checkpoint_9.pth", ("llm_proj.", "llm_model.", POSITION_IDS), True,
         "runner:language_projection+language_model"),
    ],
)
def test_file_layouts_read_into_composite_names(raw, tmp_path: Path, name, prefixes, runner, layout) -> None:
    part = subset(raw, *prefixes)
    if runner:  # frozen parameters were deleted; buffers and the optimizer state ride along
        optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
        torch.save({"model": part, "optimizer": optimizer, "config": {"run": {"lr": 1e-4}}, "scaler": None,
                    "epoch": 3}, tmp_path / name)
    else:
        torch.save(part, tmp_path / name)
    sd = read_original_checkpoint(tmp_path / name)
    assert detect_original_layout(tmp_path / name).name == layout
    assert_mapped(sd, part)
    target = composite_on_meta(tiny_vision_config(), tiny_qformer_config(), QUERIES, QWEN1_TINY)
    missing = check_state_dict(target, sd, name, allow_missing=True)
    assert not any(k.startswith(tuple(layout.split(":")[1].split("+"))) for k in missing)  # present parts complete


def write_pipeline_dir(raw: dict[str, torch.Tensor], directory: Path, frozen_llm: bool) -> None:
    """DeepSpeed PipelineModule files: stage 0 (vision + embeddings), 4 identities, blocks, norm, head, loss."""
    directory.mkdir(parents=True)
    stage0 = {f"visionpipe.{k}": v for k, v in raw.items() if not k.startswith("llm_model.")}
    stage0["wtepipe.word_embeddings.weight"] = raw["llm_model.transformer.wte.weight"]
    stages = [stage0, {}, {}, {}, {}]
    for i in range(LAYERS):
        block = f"llm_model.transformer.h.{i}."
        stages.append({f"layer.{k[len(block):]}": v for k, v in raw.items() if k.startswith(block)})
    stages += [{"final_layernorm.weight": raw["llm_model.transformer.ln_f.weight"]},
               {"lm_head.weight": raw["llm_model.lm_head.weight"]}, {}]
    if frozen_llm:
        stages.append({"occupy.weight": torch.zeros(10, 10)})
    for index, stage in enumerate(stages):
        torch.save(stage, directory / f"layer_{index:02d}-model_states.pt")
    torch.save({"module": None, "global_steps": 7}, directory / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("frozen_llm", [False, True])
def test_pipeline_dir_equals_the_full_checkpoint(raw, tmp_path: Path, frozen_llm: bool) -> None:
    torch.save(raw, tmp_path / "model.pth")
    write_pipeline_dir(raw, tmp_path / "run" / "global_step7", frozen_llm)
    (tmp_path / "run" / "latest").write_text("global_step7")
    full = read_original_checkpoint(tmp_path / "model.pth")
    for path in (tmp_path / "run" / "global_step7", tmp_path / "run"):
        sd = read_original_checkpoint(path)
        assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in sd)
        assert detect_original_layout(path).container == "pipeline"
    assert_mapped(full, raw)
    target = composite_on_meta(tiny_vision_config(), tiny_qformer_config(), QUERIES, QWEN1_TINY)
    assert check_state_dict(target, full, "model.pth") == []


# ------------------------------------------------------------------------------------------------------- errors
def test_unknown_layout_names_file_and_keys(raw, tmp_path: Path) -> None:
    torch.save({**subset(raw, "llm_proj."), "t5_proj.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: .*not part of the MiniGPT4Qwen.*'t5_proj\.weight'"):
        read_original_checkpoint(tmp_path / "other.pth")
    torch.save(subset(raw, POSITION_IDS), tmp_path / "buffers.pth")
    with pytest.raises(CheckpointError, match=r"buffers\.pth: no weights"):
        read_original_checkpoint(tmp_path / "buffers.pth")
    with pytest.raises(CheckpointError, match=r"absent\.pth: file not found"):
        read_original_checkpoint(tmp_path / "absent.pth")


def test_bad_pipeline_dirs(raw, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no layer_XX-model_states.pt files"):
        read_original_checkpoint(tmp_path)
    write_pipeline_dir(raw, tmp_path / "gap", frozen_llm=False)
    (tmp_path / "gap" / "layer_06-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"gap: incomplete pipeline checkpoint, missing layer file\(s\) \[6\]"):
        read_original_checkpoint(tmp_path / "gap")
    write_pipeline_dir(raw, tmp_path / "odd", frozen_llm=False)
    torch.save({"layer.ln_1.weight": torch.ones(H), "layer.extra": torch.ones(1)},
               tmp_path / "odd" / "layer_05-model_states.pt")
    with pytest.raises(CheckpointError, match=r"layer_05-model_states\.pt: key 'layer\.extra'"):
        read_original_checkpoint(tmp_path / "odd")
