"""Vision tower and Q-Former sizes read from the weights (meta tensors), given in the config, or from a preset; the
real checkpoints' manifests, ViT-g at 224 and 364, ViT-L, and the errors when sources disagree."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2VisionConfig, Blip2VisionModel

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.lavis import blip2_pretrained_keymap, eva_vit_keymap, read_eva_vit_g
from minigpt4qwen.checkpoint.original import original_keymap
from minigpt4qwen.checkpoint.sources import WeightSource, read_qformer_weights, read_vision_weights
from minigpt4qwen.checkpoint.vision_sizes import VisionArchitecture, resolve_architecture
from minigpt4qwen.config import ModelConfig, QFormerSizes, VisionSizes, load_config
from minigpt4qwen.model.configs import blip2_qformer_config, eva_vit_g_config, tiny_vision_config
from tests.test_lavis_checkpoints import manifest, meta_tensors

Make = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """The sizes of a tiny LAVIS file pair (ViT, then Q-Former)."""

    width: int
    depth: int
    mlp: int
    patch: int
    image: int
    qwidth: int
    qdepth: int
    qmlp: int
    freq: int
    queries: int


# A: the tiny tower's sizes (4 heads: vision_arch=tiny). B: every size different, and heads that the default
# eva_vit_g preset (16 ViT heads, 12 Q-Former heads) divide, so B loads with no size settings at all.
A = Shape(width=32, depth=2, mlp=64, patch=7, image=28, qwidth=32, qdepth=2, qmlp=64, freq=2, queries=8)
B = Shape(width=48, depth=3, mlp=96, patch=8, image=32, qwidth=24, qdepth=3, qmlp=40, freq=1, queries=6)


def randn(seed: int = 0) -> Make:
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen) * 0.05 + (1.0 if len(shape) == 1 else 0.0)


def meta(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def lavis_eva(s: Shape, make: Make, prefix: str = "") -> dict[str, torch.Tensor]:
    """An EVA ViT state dict with LAVIS's key names (eva_vit_g.pth, or a BLIP-2 file's `visual_encoder.`)."""
    w = s.width
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, (s.image // s.patch) ** 2 + 1, w),
              "patch_embed.proj.weight": (w, 3, s.patch, s.patch), "patch_embed.proj.bias": (w,)}
    for i in range(s.depth):
        shapes |= {f"blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (w,), "norm1.bias": (w,), "attn.q_bias": (w,), "attn.v_bias": (w,),
            "attn.qkv.weight": (3 * w, w), "attn.proj.weight": (w, w), "attn.proj.bias": (w,), "norm2.weight": (w,),
            "norm2.bias": (w,), "mlp.fc1.weight": (s.mlp, w), "mlp.fc1.bias": (s.mlp,), "mlp.fc2.weight": (w, s.mlp),
            "mlp.fc2.bias": (w,)}.items()}
    return {prefix + k: make(v) for k, v in shapes.items()}


def lavis_blip2(s: Shape, make: Make, cross_width: int | None = None, heads: tuple[str, ...] = ("t5_proj",)
                ) -> dict[str, torch.Tensor]:
    """The `['model']` of a LAVIS BLIP-2 / InstructBLIP file: queries, ln_vision, Q-Former with its text branch."""
    d, f, bert = s.qwidth, s.qmlp, "Qformer.bert."
    shapes = {"query_tokens": (1, s.queries, d), "ln_vision.weight": (s.width,), "ln_vision.bias": (s.width,),
              f"{bert}embeddings.LayerNorm.weight": (d,), f"{bert}embeddings.LayerNorm.bias": (d,),
              f"{bert}embeddings.word_embeddings.weight": (30, d),
              f"{bert}embeddings.position_embeddings.weight": (64, d)}
    shapes |= {f"{h}.weight": (16, d) for h in heads} | {f"{h}.bias": (16,) for h in heads}
    for i in range(s.qdepth):
        linears = {"attention.self.query": (d, d), "attention.self.key": (d, d), "attention.self.value": (d, d),
                   "attention.output.dense": (d, d), "intermediate_query.dense": (f, d), "output_query.dense": (d, f),
                   "intermediate.dense": (f, d), "output.dense": (d, f)}
        norms = ["attention.output.LayerNorm", "output_query.LayerNorm", "output.LayerNorm"]
        if i % s.freq == 0:
            e = cross_width or s.width
            linears |= {"crossattention.self.query": (d, d), "crossattention.self.key": (d, e),
                        "crossattention.self.value": (d, e), "crossattention.output.dense": (d, d)}
            norms.append("crossattention.output.LayerNorm")
        layer = f"{bert}encoder.layer.{i}."
        for name, shape in linears.items():
            shapes |= {f"{layer}{name}.weight": shape, f"{layer}{name}.bias": shape[:1]}
        for name in norms:
            shapes |= {f"{layer}{name}.{p}": (d,) for p in ("weight", "bias")}
    return {k: make(v) for k, v in shapes.items()}


def write_lavis(root: Path, s: Shape, seed: int = 0, **blip2_options) -> tuple[Path, Path]:
    """eva_vit_g.pth (fp16, as published) and blip2_pretrained_flant5xxl.pth of shape `s` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    make = randn(seed)
    torch.save({k: v.half() for k, v in lavis_eva(s, make).items()}, root / "eva_vit_g.pth")
    torch.save({"model": lavis_blip2(s, make, **blip2_options)}, root / "blip2_pretrained_flant5xxl.pth")
    return root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth"


def lavis_sources(s: Shape, **blip2_options) -> list[WeightSource]:
    """Meta-tensor sources of shape `s`, converted as the readers convert them."""
    vit = eva_vit_keymap().convert(lavis_eva(s, meta), source="eva")
    qformer = blip2_pretrained_keymap().convert(lavis_blip2(s, meta, **blip2_options), source="blip2")
    return [WeightSource("model.vision_weights", Path("eva.pth"), vit),
            WeightSource("model.qformer_weights", Path("blip2.pth"), qformer)]


def sizes_of(arch: VisionArchitecture | Blip2Config) -> dict[str, int]:
    """The sizes of a resolved architecture or of a model's config, named as `Shape`'s fields."""
    v, q = (arch.vision, arch.qformer) if isinstance(arch, VisionArchitecture) else (arch.vision_config,
                                                                                      arch.qformer_config)
    return {"width": v.hidden_size, "depth": v.num_hidden_layers, "mlp": v.intermediate_size, "patch": v.patch_size,
            "image": v.image_size, "qwidth": q.hidden_size, "qdepth": q.num_hidden_layers, "qmlp": q.intermediate_size,
            "freq": q.cross_attention_frequency, "queries": arch.num_query_tokens}


def expected(s: Shape) -> dict[str, int]:
    return {k: getattr(s, k) for k in ("width", "depth", "mlp", "patch", "image", "qwidth", "qdepth", "qmlp", "freq",
                                       "queries")}


@dataclass
class _Wrapper:
    model: ModelConfig = field(default_factory=ModelConfig)


# ------------------------------------------------------------------------------------- the real checkpoints
def real_sources(pos_rows: int = 257) -> list[WeightSource]:
    eva = meta_tensors(manifest("eva_vit_g.json")["state_dict"])
    eva["pos_embed"] = torch.empty(1, pos_rows, 1408, device="meta")
    blip2 = meta_tensors(manifest("qformer_minigpt4qwen.json")["state_dict"])
    return [WeightSource("model.vision_weights", Path("eva_vit_g.pth"), eva_vit_keymap().convert(eva, "eva")),
            WeightSource("model.qformer_weights", Path("blip2.pth"), blip2_pretrained_keymap().convert(blip2, "b"))]


@pytest.mark.parametrize(("rows", "image"), [(257, 224), (677, 364)])  # 16x16 or 26x26 patches of 14 px
def test_real_files_give_eva_vit_g_and_the_lavis_qformer(rows: int, image: int) -> None:
    arch = resolve_architecture(ModelConfig(), real_sources(rows))
    eva, qformer = eva_vit_g_config(image), blip2_qformer_config()
    for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                 "image_size", "layer_norm_eps", "hidden_act"):
        assert getattr(arch.vision, attr) == getattr(eva, attr), attr
    for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "cross_attention_frequency", "encoder_hidden_size", "layer_norm_eps"):
        assert getattr(arch.qformer, attr) == getattr(qformer, attr), attr
    assert arch.num_query_tokens == 32
    # Every size but the heads is read from the files; the heads are LAVIS's (bert-base-uncased: 12).
    assert {k for k, origin in arch.origins.items() if origin == "vision_arch eva_vit_g"} == {"vision.heads",
                                                                                            "qformer.heads"}
    assert arch.origins["image_size"] == "eva_vit_g.pth" and arch.origins["num_query_tokens"] == "blip2.pth"


def test_the_original_projects_full_checkpoint_tells_the_same_sizes() -> None:
    full = meta_tensors(manifest("minigpt4qwen_7b_full_state_dict.json")["state_dict"])
    checkpoint = WeightSource("model.checkpoint", Path("model.pth"), original_keymap().convert(full, "model.pth"))
    arch = resolve_architecture(ModelConfig(), [checkpoint])
    assert sizes_of(arch) == sizes_of(resolve_architecture(ModelConfig(), real_sources()))


def test_vit_l_and_a_364_px_hugging_face_tower() -> None:
    vit_l = Shape(width=1024, depth=24, mlp=4096, patch=14, image=224, qwidth=768, qdepth=12, qmlp=3072, freq=2,
                  queries=32)
    arch = resolve_architecture(ModelConfig(), lavis_sources(vit_l))
    assert sizes_of(arch) == expected(vit_l)
    assert arch.vision.num_attention_heads == 16 and arch.qformer.encoder_hidden_size == 1024
    with torch.device("meta"):
        tower = Blip2VisionModel(Blip2VisionConfig(image_size=364))
    hf = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    arch = resolve_architecture(ModelConfig(), [WeightSource("model.vision_weights", Path("hf"), hf)])
    assert arch.vision.image_size == 364 and arch.origins["image_size"] == "hf"


# ------------------------------------------------------------------------------------ config, files, presets
def test_explicit_sizes_without_files_and_typed_config_keys() -> None:
    cfg = load_config(None, ["model.vision_arch=tiny", "model.vision.width=48", "model.vision.heads=6",
                             "model.qformer.cross_attention_freq=1", "model.num_query_tokens=5"], _Wrapper).model
    assert isinstance(cfg.vision, VisionSizes) and isinstance(cfg.qformer, QFormerSizes)
    arch = resolve_architecture(cfg, [])
    assert (arch.vision.hidden_size, arch.vision.num_attention_heads, arch.qformer.cross_attention_frequency,
            arch.qformer.encoder_hidden_size, arch.num_query_tokens) == (48, 6, 1, 48, 5)
    assert arch.vision.image_size == tiny_vision_config().image_size  # the rest: the tiny preset
    with pytest.raises(ValueError, match="encoder_width"):
        load_config(None, ["model.qformer.encoder_width=48"], _Wrapper)  # always the ViT width: no such key
    with pytest.raises(ValueError, match=r"model\.vision\.depth must be >= 1"):
        resolve_architecture(load_config(None, ["model.vision.depth=0"], _Wrapper).model, [])


def test_files_are_read_as_meta_tensors(tmp_path: Path) -> None:
    eva, blip2 = write_lavis(tmp_path, B)
    for source in (read_vision_weights(eva, meta=True), read_qformer_weights(blip2, meta=True)):
        assert source.tensors and all(t.is_meta for t in source.tensors.values())
    assert sizes_of(resolve_architecture(ModelConfig(), [read_vision_weights(eva, meta=True),
                                                         read_qformer_weights(blip2, meta=True)])) == expected(B)


def test_a_single_cross_attention_layer_fits_the_presets_frequency() -> None:
    arch = resolve_architecture(ModelConfig(vision_arch="tiny"), lavis_sources(A))  # 2 layers, cross in layer 0 only
    assert arch.qformer.cross_attention_frequency == 2 and arch.origins["qformer.cross_attention_freq"] == (
        "vision_arch tiny")
    with pytest.raises(CheckpointError, match=r"cross_attention_freq is 1 in the config.*layer 0 of 2 only"):
        resolve_architecture(ModelConfig(vision_arch="tiny", qformer=QFormerSizes(cross_attention_freq=1)),
                             lavis_sources(A))


# --------------------------------------------------------------------------------------------------- errors
def test_files_of_different_towers_are_named_with_key_and_shape() -> None:
    vit_b, qformer_a = lavis_sources(B)[0], lavis_sources(A)[1]
    with pytest.raises(CheckpointError, match=r"disagree on the ViT width \(model\.vision\.width\): eva\.pth: "
                       r"vision_model\.embeddings\.class_embedding has shape \(1, 1, 48\) \(= 48\), but blip2\.pth: "
                       r"vision_model\.post_layernorm\.weight \(LAVIS ln_vision\) has shape \(32,\) \(= 32\)"):
        resolve_architecture(ModelConfig(), [vit_b, qformer_a])
    # A Q-Former whose cross-attention was trained on another tower than its own ln_vision says.
    with pytest.raises(CheckpointError, match=r"blip2\.pth: vision_model\.post_layernorm\.weight.*\(= 48\), but "
                       r"blip2\.pth: qformer\.encoder\.layer\.0\.crossattention\.attention\.key\.weight \(the "
                       r"Q-Former's cross-attention input\) has shape \(24, 40\) \(= 40\)"):
        resolve_architecture(ModelConfig(), lavis_sources(B, cross_width=40)[1:])


@pytest.mark.parametrize(("override", "message"), [
    ("model.vision.width=64", r"model\.vision\.width is 64 in the config, but eva\.pth: vision_model\.embeddings\."
                              r"class_embedding has shape \(1, 1, 48\) \(= 48\)"),
    ("model.image_size=224", r"model\.image_size is 224 in the config, but eva\.pth: vision_model\.embeddings\."
                             r"position_embedding has shape \(1, 17, 48\): 4 x 4 patches of 8 px \(= 32\)"),
    ("model.num_query_tokens=32", r"model\.num_query_tokens is 32 .* blip2\.pth: query_tokens has shape \(1, 6, 24\)"),
    ("model.qformer.mlp_width=3072", r"model\.qformer\.mlp_width is 3072 .*intermediate_query\.dense\.weight has "
                                     r"shape \(40, 24\)"),
    ("model.vision.heads=5", r"ViT width 48 \(from eva\.pth\) does not split into 5 attention heads \(from config\)"),
    ("model.vision_arch=nope", r"unknown model\.vision_arch 'nope'"),
])
def test_config_that_disagrees_with_the_files(override: str, message: str) -> None:
    cfg = load_config(None, [override], _Wrapper).model
    with pytest.raises((CheckpointError, ValueError), match=message):
        resolve_architecture(cfg, lavis_sources(B))


def test_heads_the_preset_cannot_fit_ask_for_the_setting() -> None:
    odd = Shape(width=40, depth=1, mlp=80, patch=8, image=16, qwidth=24, qdepth=1, qmlp=40, freq=1, queries=4)
    with pytest.raises(CheckpointError, match=r"ViT width 40 \(from eva\.pth\) does not split into 16 attention heads "
                       r"\(from vision_arch eva_vit_g\).*set model\.vision\.heads"):
        resolve_architecture(ModelConfig(), lavis_sources(odd))
    arch = resolve_architecture(ModelConfig(vision=VisionSizes(heads=5)), lavis_sources(odd))
    assert arch.vision.num_attention_heads == 5 and arch.origins["vision.heads"] == "config"


def test_shapes_no_blip2_model_has() -> None:
    vit, qformer = lavis_sources(B)
    skewed = dict(vit.tensors, **{"vision_model.embeddings.position_embedding": meta((1, 20, 48))})
    with pytest.raises(CheckpointError, match=r"position_embedding has shape \(1, 20, 48\): 19 patch positions"):
        resolve_architecture(ModelConfig(), [WeightSource(vit.setting, vit.path, skewed)])
    gap = {k: v for k, v in vit.tensors.items() if not k.startswith("vision_model.encoder.layers.1.")}
    with pytest.raises(CheckpointError, match=r"eva\.pth: vision_model\.encoder\.layers\.\* holds layers \[0, 2\]"):
        resolve_architecture(ModelConfig(), [WeightSource(vit.setting, vit.path, gap)])
    odd = {k: v for k, v in qformer.tensors.items() if not k.startswith("qformer.encoder.layer.2.crossattention.")}
    with pytest.raises(CheckpointError, match=r"cross-attention in Q-Former layers \[0, 1\] of 3"):
        resolve_architecture(ModelConfig(), [WeightSource(qformer.setting, qformer.path, odd)])


def test_clip_vit_l_is_refused_with_the_reason(tmp_path: Path) -> None:
    clip = {"conv1.weight": torch.zeros(8, 3, 2, 2), "class_embedding": torch.zeros(8),
            "positional_embedding": torch.zeros(5, 8), "ln_pre.weight": torch.ones(8)}
    torch.save(clip, tmp_path / "clip_vit_L.pth")
    with pytest.raises(CheckpointError, match=r"clip_vit_L\.pth: a CLIP ViT \(LAVIS clip_L.*ln_pre"):
        read_eva_vit_g(tmp_path / "clip_vit_L.pth")


def test_hf_config_that_contradicts_its_own_tensors(tmp_path: Path) -> None:
    from tests.test_vision_sizes_build import save_hf_blip2

    directory = save_hf_blip2(tmp_path / "hf", A, vision_heads=8, qformer_heads=8)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ViT MLP width.*hf: vision_model\.encoder\.layers\.0\.mlp\.fc1\."
                       r"weight has shape \(64, 32\) \(= 64\), but .*hf: config\.json vision_config\.intermediate_size "
                       r"\(= 128\)"):
        resolve_architecture(ModelConfig(), [read_vision_weights(directory, meta=True)])
