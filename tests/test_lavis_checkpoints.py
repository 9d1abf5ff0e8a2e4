"""LAVIS source files (eva_vit_g.pth, blip2_pretrained*.pth): manifest coverage on meta, numerical parity against
plain-torch references written with the original key names, and the error messages for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel

from minigpt4qwen.checkpoint.keymap import CheckpointError, check_state_dict, load_checked
from minigpt4qwen.checkpoint.lavis import (
    blip2_pretrained_keymap,
    eva_vit_keymap,
    read_blip2_pretrained,
    read_eva_vit_g,
)
from minigpt4qwen.model.configs import (
    LN_VISION_EPS,
    blip2_qformer_config,
    eva_vit_g_config,
    tiny_qformer_config,
    tiny_vision_config,
)
from tests.reference import MANIFESTS

W, DEPTH, HEADS, IMAGE, PATCH, MLP = 32, 2, 4, 28, 7, 64  # tiny_vision_config
QW, QLAYERS, QHEADS, QFFN, QUERIES = 32, 2, 4, 64, 8  # tiny_qformer_config


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def meta_tensors(entries: dict) -> dict[str, torch.Tensor]:
    """Manifest entries ({'shape': [...], 'dtype': ...} or a bare shape list) as meta tensors."""
    out = {}
    for key, entry in entries.items():
        shape = entry["shape"] if isinstance(entry, dict) else entry
        dtype = getattr(torch, entry.get("dtype", "float32")) if isinstance(entry, dict) else torch.float32
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def holder(**parts: nn.Module | nn.Parameter) -> nn.Module:
    """A module with the composite model's attribute names, holding only the given parts."""
    module = nn.Module()
    for name, part in parts.items():
        setattr(module, name, part)
    return module


# ---------------------------------------------------------------------------------------------- manifests on meta
def test_eva_manifest_maps_onto_blip2_vision_model() -> None:
    source = meta_tensors(manifest("eva_vit_g.json")["state_dict"])
    converted = eva_vit_keymap(target_prefix="").convert(source, source="eva_vit_g.json")
    with torch.device("meta"):
        vision = Blip2VisionModel(eva_vit_g_config())
    missing = check_state_dict(vision, converted, "eva_vit_g.json", allow_missing=True)
    assert missing == ["post_layernorm.weight", "post_layernorm.bias"]  # ln_vision comes from the BLIP-2 file
    assert len(converted) == len(source) - 39  # q_bias + v_bias -> one qkv.bias per block


def test_qformer_manifest_maps_onto_qformer_queries_and_ln_vision() -> None:
    qformer_manifest = manifest("qformer_minigpt4qwen.json")
    lavis_file = manifest("lavis_source_checkpoints.json")["blip2_pretrained_flant5xxl.pth"]["expected_model_keys"]
    # Everything a blip2_pretrained*.pth may carry: kept keys, the text branch, and t5_proj.
    source = meta_tensors(
        {**qformer_manifest["state_dict"], **qformer_manifest["dropped_by_minigpt4qwen"], **lavis_file}
    )
    converted = blip2_pretrained_keymap().convert(source, source="blip2 manifest")
    with torch.device("meta"):
        vision = Blip2VisionModel(eva_vit_g_config())
        target = holder(vision_model=vision, query_tokens=nn.Parameter(torch.empty(1, 32, 768)),
                        qformer=Blip2QFormerModel(blip2_qformer_config()))
    missing = check_state_dict(target, converted, "blip2 manifest", allow_missing=True)
    assert set(missing) == {f"vision_model.{k}" for k in vision.state_dict() if not k.startswith("post_layernorm.")}
    assert {k for k in converted if not k.startswith("vision_model.")} == set(target.state_dict()) - {
        f"vision_model.{k}" for k in vision.state_dict()}


# ------------------------------------------------------------------------------------------- tiny files on disk
def tiny_eva_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Original EVA key names, random values (every bias and norm gain too), fp16 as on disk."""
    shapes = {"cls_token": (1, 1, W), "pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, W),
              "patch_embed.proj.weight": (W, 3, PATCH, PATCH), "patch_embed.proj.bias": (W,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({f"{b}norm1.weight": (W,), f"{b}norm1.bias": (W,), f"{b}attn.q_bias": (W,),
                       f"{b}attn.v_bias": (W,), f"{b}attn.qkv.weight": (3 * W, W), f"{b}attn.proj.weight": (W, W),
                       f"{b}attn.proj.bias": (W,), f"{b}norm2.weight": (W,), f"{b}norm2.bias": (W,),
                       f"{b}mlp.fc1.weight": (MLP, W), f"{b}mlp.fc1.bias": (MLP,), f"{b}mlp.fc2.weight": (W, MLP),
                       f"{b}mlp.fc2.bias": (W,)})
    # Small values (as in trained ViTs' residual streams) keep the variance low enough that ln_vision's eps
    # (1e-5, not the blocks' 1e-6) shows up far above the tolerance.
    return {k: (torch.randn(s, generator=gen) * 0.05 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)).half()
            for k, s in shapes.items()}


def tiny_blip2_model(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The `['model']` of a tiny blip2_pretrained file, with the keys MiniGPT4Qwen ignores included."""
    bert = "Qformer.bert."
    sd = {"query_tokens": torch.randn(1, QUERIES, QW, generator=gen),
          "ln_vision.weight": 1 + torch.randn(W, generator=gen), "ln_vision.bias": torch.randn(W, generator=gen),
          f"{bert}embeddings.position_ids": torch.arange(64)[None],
          f"{bert}embeddings.LayerNorm.weight": 1 + 0.1 * torch.randn(QW, generator=gen),
          f"{bert}embeddings.LayerNorm.bias": 0.1 * torch.randn(QW, generator=gen),
          f"{bert}embeddings.word_embeddings.weight": torch.randn(30, QW, generator=gen),
          "t5_proj.weight": torch.randn(16, QW, generator=gen), "t5_proj.bias": torch.randn(16, generator=gen),
          "Qformer.cls.predictions.bias": torch.randn(30, generator=gen)}
    for i in range(QLAYERS):
        p = f"{bert}encoder.layer.{i}."
        linears = {"attention.self.query": (QW, QW), "attention.self.key": (QW, QW), "attention.self.value": (QW, QW),
                   "attention.output.dense": (QW, QW), "intermediate_query.dense": (QFFN, QW),
                   "output_query.dense": (QW, QFFN), "intermediate.dense": (QFFN, QW), "output.dense": (QW, QFFN)}
        norms = ["attention.output.LayerNorm", "output_query.LayerNorm", "output.LayerNorm"]
        if i % 2 == 0:
            linears.update({"crossattention.self.query": (QW, QW), "crossattention.self.key": (QW, W),
                            "crossattention.self.value": (QW, W), "crossattention.output.dense": (QW, QW)})
            norms.append("crossattention.output.LayerNorm")
        for name, shape in linears.items():
            sd[f"{p}{name}.weight"] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            sd[f"{p}{name}.bias"] = 0.1 * torch.randn(shape[0], generator=gen)
        for name in norms:
            sd[f"{p}{name}.weight"] = 1 + 0.1 * torch.randn(QW, generator=gen)
            sd[f"{p}{name}.bias"] = 0.1 * torch.randn(QW, generator=gen)
    return sd


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lavis")
    gen = torch.Generator().manual_seed(0)
    torch.save(tiny_eva_state_dict(gen), root / "eva_vit_g.pth")
    torch.save({"model": tiny_blip2_model(gen)}, root / "blip2_pretrained_flant5xxl.pth")
    return {"eva": root / "eva_vit_g.pth", "blip2": root / "blip2_pretrained_flant5xxl.pth"}


# ------------------------------------------------------------------------ independent plain-torch references
def ref_attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads):
    b, n, d = q_in.shape
    split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
    q, k, v = split(F.linear(q_in, wq, bq)), split(F.linear(kv_in, wk, bk)), split(F.linear(kv_in, wv, bv))
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1)


def ref_eva_ln_vision(sd: dict[str, torch.Tensor], ln: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """ln_vision(EVA(pixels)) in LAVIS terms: pre-LN blocks, q/v biases only, exact GELU."""
    g = {k: v.float() for k, v in sd.items()}
    x = F.conv2d(pixels, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([g["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + g["pos_embed"]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (W,), g[p + "norm1.weight"], g[p + "norm1.bias"], eps=1e-6)
        wq, wk, wv = g[p + "attn.qkv.weight"].chunk(3)
        x = x + F.linear(ref_attention(h, h, wq, g[p + "attn.q_bias"], wk, None, wv, g[p + "attn.v_bias"], HEADS),
                         g[p + "attn.proj.weight"], g[p + "attn.proj.bias"])
        h = F.layer_norm(x, (W,), g[p + "norm2.weight"], g[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, g[p + "mlp.fc1.weight"], g[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, g[p + "mlp.fc2.weight"], g[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (W,), ln["ln_vision.weight"], ln["ln_vision.bias"], eps=1e-5)


def ref_qformer(sd: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """LAVIS BertModel with query_embeds only: post-LN, cross-attention in even layers, query FFN."""
    g = {k.removeprefix("Qformer.bert."): v for k, v in sd.items()}
    ln = lambda x, name: F.layer_norm(x, (QW,), g[name + ".weight"], g[name + ".bias"], eps=1e-12)
    lin = lambda x, name: F.linear(x, g[name + ".weight"], g[name + ".bias"])
    x = ln(sd["query_tokens"].expand(image.shape[0], -1, -1), "embeddings.LayerNorm")
    for i in range(QLAYERS):
        p = f"encoder.layer.{i}."
        for kind, context in (("attention", None), ("crossattention", image)):
            if kind == "crossattention" and i % 2:
                continue
            kv = x if context is None else context
            s = f"{p}{kind}.self."
            att = ref_attention(x, kv, g[s + "query.weight"], g[s + "query.bias"], g[s + "key.weight"],
                                g[s + "key.bias"], g[s + "value.weight"], g[s + "value.bias"], QHEADS)
            x = ln(x + lin(att, f"{p}{kind}.output.dense"), f"{p}{kind}.output.LayerNorm")
        h = F.gelu(lin(x, p + "intermediate_query.dense"))
        x = ln(x + lin(h, p + "output_query.dense"), p + "output_query.LayerNorm")
    return x


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_vision_and_qformer_match_plain_torch_references(tiny_files: dict[str, Path], attn: str) -> None:
    eva_sd = read_eva_vit_g(tiny_files["eva"])
    blip2_sd = read_blip2_pretrained(tiny_files["blip2"])
    assert eva_sd["vision_model.encoder.layers.0.self_attn.qkv.bias"].dtype == torch.float16  # stored dtype kept
    vision = Blip2VisionModel._from_config(tiny_vision_config(IMAGE), attn_implementation=attn).eval()
    vision.post_layernorm.eps = LN_VISION_EPS
    qformer = Blip2QFormerModel._from_config(tiny_qformer_config(W), attn_implementation=attn).eval()
    target = holder(vision_model=vision, qformer=qformer, query_tokens=nn.Parameter(torch.zeros(1, QUERIES, QW)))
    load_checked(target, {**eva_sd, **blip2_sd}, "tiny files")  # complete: nothing missing, nothing unexpected

    raw_eva = torch.load(tiny_files["eva"], weights_only=True)
    raw_blip2 = torch.load(tiny_files["blip2"], weights_only=True)["model"]
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = vision(pixel_values=pixels).last_hidden_state
        queries = qformer(query_embeds=target.query_tokens.expand(3, -1, -1), encoder_hidden_states=image,
                          encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
    ref_image = ref_eva_ln_vision(raw_eva, raw_blip2, pixels)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(queries, ref_qformer(raw_blip2, ref_image), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- errors
def test_missing_file_names_file_and_original_location(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: file not found.*cache/ckpt/eva/eva_vit_g\.pth"):
        read_eva_vit_g(tmp_path / "eva_vit_g.pth")
    with pytest.raises(CheckpointError, match="blip2_pretrained_flant5xxl.pth"):
        read_blip2_pretrained(tmp_path / "nope.pth")


def test_truncated_and_random_files_give_clear_errors(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    data = tiny_files["eva"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    for name in ("cut.pth", "noise.pth"):
        with pytest.raises(CheckpointError, match=rf"{name}: cannot read the EVA ViT-g weights.*truncated, corrupt"):
            read_eva_vit_g(tmp_path / name)


def test_wrong_file_for_the_slot_lists_unknown_keys(tiny_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"flant5xxl\.pth: .*not part of the EVA.*'query_tokens'"):
        read_eva_vit_g(tiny_files["blip2"])
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: .*not part of the BLIP-2.*'cls_token'"):
        read_blip2_pretrained(tiny_files["eva"])


def test_shape_mismatch_is_caught_at_load_naming_file_and_key(tiny_files: dict[str, Path]) -> None:
    state_dict = read_eva_vit_g(tiny_files["eva"])
    vision = Blip2VisionModel(tiny_vision_config(image_size=2 * IMAGE))  # more patches: pos embedding differs
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: .*shape mismatch.*embeddings\.position_embedding"):
        load_checked(holder(vision_model=vision), state_dict, str(tiny_files["eva"]), allow_missing=True)
