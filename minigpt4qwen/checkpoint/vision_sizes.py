"""Vision tower and Q-Former sizes: given in the config, read from the weights, or taken from a named preset.

Each size is, in this order: the config's value (`model.vision.*`, `model.qformer.*`, `model.image_size`,
`model.num_query_tokens`), which every weight source must agree with; else what the sources say, which must agree
with each other; else the `model.vision_arch` preset's. Sources are read as meta tensors (shapes from the file
headers or a memory-mapped pickle, no data) in the composite names, so one set of rules serves LAVIS files,
Hugging Face BLIP-2 directories and trained checkpoints:

    ViT width        class_embedding [1, 1, W]; ln_vision (post_layernorm) [W]; Q-Former cross-attention key [D, W]
    ViT depth        how many vision_model.encoder.layers.{i}
    ViT MLP width    layers.0.mlp.fc1.weight [M, W]
    patch size       patch_embedding.weight [W, 3, P, P]
    image size       position_embedding [1, 1 + (S/P)^2, W], P from the same source (P=14: 257 rows = 224 px,
                     677 rows = 364 px)
    Q-Former width   qformer.layernorm [D]; query_tokens [1, N, D]; a trained projection [H, D]
    Q-Former depth   how many qformer.encoder.layer.{i}; MLP width: intermediate_query.dense [F, D]
    cross-attention  which layers have crossattention.* (every k-th from layer 0; in layer 0 only: any k >= depth)
    query count      query_tokens [1, N, D]

No shape holds the number of attention heads. It comes from the config, else a Hugging Face directory's
config.json (which states every size and is checked against the directory's tensors), else the preset:
`eva_vit_g` is LAVIS's EVA ViT-g (16 heads, also right for ViT-L/14) and the bert-base-uncased config LAVIS builds
every Q-Former from (12 heads; also its eps 1e-12 and GELU, which no shape shows either).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, PretrainedConfig

from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.sources import WeightSource, read_qformer_weights, read_vision_weights
from minigpt4qwen.config import ModelConfig
from minigpt4qwen.model.configs import vision_preset

logger = logging.getLogger(__name__)

# Config path under `model.` -> (the part it sizes, the transformers config attribute, what it is, for messages).
SIZES: dict[str, tuple[str, str, str]] = {
    "vision.width": ("vision", "hidden_size", "the ViT width"),
    "vision.depth": ("vision", "num_hidden_layers", "the ViT depth"),
    "vision.heads": ("vision", "num_attention_heads", "the ViT's attention heads"),
    "vision.mlp_width": ("vision", "intermediate_size", "the ViT MLP width"),
    "vision.patch_size": ("vision", "patch_size", "the patch size"),
    "image_size": ("vision", "image_size", "the image size"),
    "qformer.width": ("qformer", "hidden_size", "the Q-Former width"),
    "qformer.depth": ("qformer", "num_hidden_layers", "the Q-Former depth"),
    "qformer.heads": ("qformer", "num_attention_heads", "the Q-Former's attention heads"),
    "qformer.mlp_width": ("qformer", "intermediate_size", "the Q-Former MLP width"),
    "qformer.cross_attention_freq": ("qformer", "cross_attention_frequency", "the cross-attention frequency"),
    "num_query_tokens": ("queries", "num_query_tokens", "the number of query tokens"),
}
# (size, tensor, the dimension of its shape holding the size, what the tensor is when that is not obvious)
_SHAPE_RULES = (
    ("vision.width", "vision_model.embeddings.class_embedding", -1, ""),
    ("vision.width", "vision_model.post_layernorm.weight", 0, " (LAVIS ln_vision)"),
    ("vision.width", "qformer.encoder.layer.0.crossattention.attention.key.weight", 1,
     " (the Q-Former's cross-attention input)"),
    ("vision.patch_size", "vision_model.embeddings.patch_embedding.weight", -1, ""),
    ("vision.mlp_width", "vision_model.encoder.layers.0.mlp.fc1.weight", 0, ""),
    ("qformer.width", "qformer.layernorm.weight", 0, ""),
    ("qformer.width", "query_tokens", -1, ""),
    ("qformer.width", "language_projection.weight", 1, " (the trained projection's input)"),
    ("qformer.mlp_width", "qformer.encoder.layer.0.intermediate_query.dense.weight", 0, ""),
    ("num_query_tokens", "query_tokens", 1, ""),
)
_LAYERS = {"vision.depth": "vision_model.encoder.layers", "qformer.depth": "qformer.encoder.layer"}
_LAYER_INDEX = re.compile(r"(vision_model\.encoder\.layers|qformer\.encoder\.layer)\.(\d+)\.")
_CROSS_LAYER = re.compile(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
# The parts of a Hugging Face directory's config.json that count, by the slot the directory fills.
_HF_PARTS = {"model.vision_weights": ("vision",), "model.qformer_weights": ("qformer", "queries")}


@dataclass(frozen=True)
class Evidence:
    """One size as one source states it: `value`, or any value >= it when `at_least`."""

    value: int
    source: str
    detail: str
    at_least: bool = False

    def __str__(self) -> str:
        return f"{self.source}: {self.detail} ({'>=' if self.at_least else '='} {self.value})"


@dataclass(frozen=True)
class VisionArchitecture:
    """The resolved vision side, and where each size came from (for the log and for messages)."""

    vision: Blip2VisionConfig
    qformer: Blip2QFormerConfig
    num_query_tokens: int
    origins: dict[str, str]

    def describe(self) -> str:
        """One line: every size with its origin."""
        values = {size: getattr(self._section(part), attr) for size, (part, attr, _) in SIZES.items()}
        return ", ".join(f"{size} {values[size]} ({self.origins[size]})" for size in SIZES)

    def _section(self, part: str) -> object:
        return {"vision": self.vision, "qformer": self.qformer, "queries": self}[part]


def sizes_in_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> list[tuple[str, Evidence]]:
    """Every size the shapes of composite-named tensors (meta tensors are enough) tell.

    Args:
        tensors: e.g. a converted LAVIS file, a Hugging Face directory's vision side, or a checkpoint.
        source: the file or directory, for messages.

    Returns:
        (size, evidence) pairs, sizes named as in `SIZES`.

    Raises:
        CheckpointError: shapes no BLIP-2 model has (layers not numbered 0..n-1, a non-square position grid,
            cross-attention not in every k-th layer from layer 0).
    """
    found = []
    for size, key, dim, note in _SHAPE_RULES:
        if key in tensors:
            shape = tuple(tensors[key].shape)
            found.append((size, Evidence(shape[dim], source, f"{key}{note} has shape {shape}")))
    layers: dict[str, set[int]] = {}
    for key in tensors:
        if match := _LAYER_INDEX.match(key):
            layers.setdefault(match[1], set()).add(int(match[2]))
    for size, prefix in _LAYERS.items():
        if prefix in layers:
            depth = _depth(layers[prefix], prefix, source)
            found.append((size, Evidence(depth, source, f"{prefix}.0-{depth - 1}")))
    found += _image_size(tensors, source)
    if "qformer.encoder.layer" in layers:
        found += _cross_attention(tensors, len(layers["qformer.encoder.layer"]), source)
    return found


def sizes_in_hf_config(config: Blip2Config, source: str, parts: Sequence[str]) -> list[tuple[str, Evidence]]:
    """Every size a Hugging Face BLIP-2 config.json states for `parts` ("vision", "qformer", "queries")."""
    sections = {"vision": ("vision_config", config.vision_config), "qformer": ("qformer_config", config.qformer_config),
                "queries": ("", config)}
    found = []
    for size, (part, attr, _) in SIZES.items():
        if part in parts:
            name, section = sections[part]
            value = getattr(section, attr)
            found.append((size, Evidence(value, source, f"config.json {name + '.' if name else ''}{attr}")))
    return found


def resolve_architecture(cfg: ModelConfig, sources: Sequence[WeightSource]) -> VisionArchitecture:
    """Settles every size from the config, the sources and the preset, and checks they fit together.

    Args:
        cfg: the model config (explicit sizes and `vision_arch`).
        sources: the configured weight sources (meta tensors are enough).

    Returns:
        The vision tower and Q-Former configs, the query count, and each size's origin.

    Raises:
        CheckpointError: sources that disagree with each other or with the config (file, tensor and both shapes
            named), or sizes that do not fit together (heads that do not divide a width, an image size that is no
            multiple of the patch).
        ValueError: an unknown `vision_arch` or an explicit size below 1.
    """
    preset_vision, preset_qformer, preset_queries = vision_preset(cfg.vision_arch)
    evidence: dict[str, list[Evidence]] = {size: [] for size in SIZES}
    bases: dict[str, PretrainedConfig] = {"vision": preset_vision, "qformer": preset_qformer}
    for source in sources:
        for size, item in sizes_in_tensors(source.tensors, str(source.path)):
            evidence[size].append(item)
        if source.hf_config is not None:
            parts = _HF_PARTS.get(source.setting, ())
            for size, item in sizes_in_hf_config(source.hf_config, str(source.path), parts):
                evidence[size].append(item)
            # The directory's own config also supplies what no size covers (eps, activation, ...).
            bases.update({part: getattr(source.hf_config, f"{part}_config") for part in parts if part != "queries"})
    explicit = _explicit(cfg)
    presets = {"vision": preset_vision, "qformer": preset_qformer}
    values, origins = {}, {}
    for size, (part, attr, _) in SIZES.items():
        preset = preset_queries if part == "queries" else getattr(presets[part], attr)
        values[size], origins[size] = _settle(size, explicit[size], evidence[size], preset, cfg.vision_arch)
    _check_fit(values, origins)
    vision = _with_sizes(bases["vision"], values, "vision")
    qformer = _with_sizes(bases["qformer"], values, "qformer", encoder_hidden_size=values["vision.width"],
                          use_qformer_text_input=False)
    architecture = VisionArchitecture(vision, qformer, values["num_query_tokens"], origins)
    logger.info("vision side: %s", architecture.describe())
    return architecture


def model_architecture(cfg: ModelConfig, checkpoint: WeightSource | None = None) -> VisionArchitecture:
    """`resolve_architecture` over the config's vision and Q-Former weights (read as meta tensors) and an
    already read checkpoint.

    Args:
        cfg: the model config, its preset already resolved (paths filled).
        checkpoint: `model.checkpoint`, when it has been read (it may hold any part, or a projection).
    """
    sources = []
    if cfg.vision_weights:
        sources.append(read_vision_weights(cfg.vision_weights, meta=True))
    if cfg.qformer_weights:
        sources.append(read_qformer_weights(cfg.qformer_weights, meta=True))
    if checkpoint is not None:
        sources.append(checkpoint)
    return resolve_architecture(cfg, sources)


def _depth(indices: set[int], prefix: str, source: str) -> int:
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{source}: {prefix}.* holds layers {sorted(indices)}, not 0..n-1: an incomplete file?")
    return len(indices)


def _image_size(tensors: Mapping[str, torch.Tensor], source: str) -> list[tuple[str, Evidence]]:
    key, patch_key = "vision_model.embeddings.position_embedding", "vision_model.embeddings.patch_embedding.weight"
    if key not in tensors or patch_key not in tensors:
        return []
    shape, patch = tuple(tensors[key].shape), tensors[patch_key].shape[-1]
    grid = math.isqrt(shape[1] - 1)
    if grid * grid != shape[1] - 1:
        raise CheckpointError(f"{source}: {key} has shape {shape}: {shape[1] - 1} patch positions (after the class "
                              "token) do not form a square grid")
    detail = f"{key} has shape {shape}: {grid} x {grid} patches of {patch} px"
    return [("image_size", Evidence(grid * patch, source, detail))]


def _cross_attention(tensors: Mapping[str, torch.Tensor], depth: int, source: str) -> list[tuple[str, Evidence]]:
    layers = sorted({int(m[1]) for key in tensors if (m := _CROSS_LAYER.match(key))})
    if not layers:
        return []  # a projection-only or query-only checkpoint; a Q-Former without any is caught when loading
    if layers == [0]:
        return [("qformer.cross_attention_freq", Evidence(depth, source, f"cross-attention in layer 0 of {depth} only",
                                                          at_least=True))]
    if layers[0] != 0 or len(layers) < 2 or layers != list(range(0, depth, layers[1])):
        raise CheckpointError(f"{source}: cross-attention in Q-Former layers {layers} of {depth}; transformers' "
                              "Blip2QFormerModel has it in every k-th layer from layer 0")
    detail = f"cross-attention in layers {layers} of {depth}"
    return [("qformer.cross_attention_freq", Evidence(layers[1], source, detail))]


def _explicit(cfg: ModelConfig) -> dict[str, int | None]:
    values = {f"vision.{f.name}": getattr(cfg.vision, f.name) for f in fields(cfg.vision)}
    values |= {f"qformer.{f.name}": getattr(cfg.qformer, f.name) for f in fields(cfg.qformer)}
    values |= {"image_size": cfg.image_size, "num_query_tokens": cfg.num_query_tokens}
    for size, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"model.{size} must be >= 1 (or null: from the weights), not {value}")
    return {size: values.get(size) for size in SIZES}


def _settle(size: str, explicit: int | None, found: list[Evidence], preset: int, preset_name: str) -> tuple[int, str]:
    """One size's value and origin: the config's, else the sources' (which must agree), else the preset's."""
    what = SIZES[size][2]
    exact = [item for item in found if not item.at_least]
    bound = max((item for item in found if item.at_least), key=lambda item: item.value, default=None)
    if explicit is not None:
        clash = next((item for item in exact if item.value != explicit), None)
        if clash is None and bound is not None and explicit < bound.value:
            clash = bound
        if clash is not None:
            raise CheckpointError(f"model.{size} is {explicit} in the config, but {clash}: remove the setting to use "
                                  f"the weights' {what}, or give weights of that size")
        return explicit, "config"
    if exact:
        first = exact[0]
        clash = next((item for item in exact[1:] if item.value != first.value), None)
        if clash is None and bound is not None and first.value < bound.value:
            clash = bound
        if clash is not None:
            raise CheckpointError(f"the weights disagree on {what} (model.{size}): {first}, but {clash}. Use files "
                                  "made for each other (the ViT the Q-Former was trained on)")
        return first.value, first.source
    if bound is not None and preset < bound.value:
        return bound.value, bound.source
    return preset, f"vision_arch {preset_name}"


def _check_fit(values: dict[str, int], origins: dict[str, str]) -> None:
    for part, label in (("vision", "ViT"), ("qformer", "Q-Former")):
        width, heads = values[f"{part}.width"], values[f"{part}.heads"]
        if width % heads:
            raise CheckpointError(
                f"the {label} width {width} (from {origins[f'{part}.width']}) does not split into {heads} attention "
                f"heads (from {origins[f'{part}.heads']}); LAVIS files do not record heads: set model.{part}.heads "
                f"to the {label}'s head count (a divisor of {width})"
            )
    if values["image_size"] % values["vision.patch_size"]:
        raise CheckpointError(f"the image size {values['image_size']} (from {origins['image_size']}) is not a multiple "
                              f"of the patch size {values['vision.patch_size']} (from {origins['vision.patch_size']})")


def _with_sizes(base: PretrainedConfig, values: dict[str, int], part: str, **extra: object) -> PretrainedConfig:
    sizes = {attr: values[size] for size, (p, attr, _) in SIZES.items() if p == part}
    return type(base).from_dict({**base.to_dict(), **sizes, **extra})
