"""Typed configuration: dataclasses with documented fields, YAML on disk, dotted overrides on the command line.

    cfg = load_config("configs/train_qwen7b.yaml", ["model.trainable.language_model=true"], RunConfig)

Unknown keys and wrongly typed values are rejected by omegaconf with the offending key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minigpt4qwen.model.parts import PartDtypes, TrainableParts

T = TypeVar("T")


@dataclass
class ActivationCheckpointing:
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""

    vision_model: bool = False
    language_model: bool = False
    every: int = 1  # checkpoint every k-th block only (2: half of them, a middle ground in memory and speed)


@dataclass
class VisionSizes:
    """Explicit ViT sizes; each one left null is read from the weights, else taken from `vision_arch`.

    Only `heads` cannot be read from LAVIS files (a Hugging Face BLIP-2 directory's config.json has it).
    The image size is `ModelConfig.image_size`.
    """

    width: Optional[int] = None  # hidden size (EVA ViT-g: 1408, ViT-L: 1024)
    depth: Optional[int] = None  # number of blocks (EVA ViT-g as LAVIS builds it: 39)
    heads: Optional[int] = None  # attention heads (EVA ViT-g: 16)
    mlp_width: Optional[int] = None  # MLP hidden size (EVA ViT-g: 6144)
    patch_size: Optional[int] = None  # patch side in pixels (14)


@dataclass
class QFormerSizes:
    """Explicit Q-Former sizes; each one left null is read from the weights, else taken from `vision_arch`.

    Only `heads` cannot be read from LAVIS files (LAVIS builds the Q-Former from bert-base-uncased's config: 12).
    Its cross-attention width always equals the ViT width; the query count is `ModelConfig.num_query_tokens`.
    """

    width: Optional[int] = None  # hidden size (768)
    depth: Optional[int] = None  # number of layers (12)
    heads: Optional[int] = None  # attention heads (12)
    mlp_width: Optional[int] = None  # query FFN hidden size (3072)
    cross_attention_freq: Optional[int] = None  # cross-attention in every k-th layer from layer 0 (2)


@dataclass
class ModelConfig:
    """Where the weights come from and how each part is stored and trained.

    A `preset` (see `minigpt4qwen.presets.PRESETS`) fills the paths of the original project's `cache/ckpt` layout
    for every path left empty; explicit paths always win.
    """

    preset: Optional[str] = None  # qwen7b_chat, qwen14b_chat, qwen25_7b_instruct, qwen3_8b, llama31_8b_instruct, ...
    cache_root: str = "cache"  # the original project's weight folder (holds ckpt/eva, ckpt/blip2, ckpt/Qwen7B-chat)
    llm: Optional[str] = None  # LLM directory: Qwen1 (model_type qwen) or any transformers causal LM
    vision_weights: Optional[str] = None  # LAVIS eva_vit_g.pth, or a Hugging Face BLIP-2 directory
    qformer_weights: Optional[str] = None  # LAVIS blip2_pretrained_flant5xxl.pth, or a Hugging Face BLIP-2 directory
    # ours (incl. LoRA), the original project's model.pth / checkpoint_N.pth / pipeline dir
    checkpoint: Optional[str] = None
    vision_arch: str = "eva_vit_g"  # sizes neither the config nor the weights give: eva_vit_g | tiny (tests, demo)
    vision: VisionSizes = field(default_factory=VisionSizes)  # explicit ViT sizes (null: from the weights)
    qformer: QFormerSizes = field(default_factory=QFormerSizes)  # explicit Q-Former sizes (null: from the weights)
    image_size: Optional[int] = None  # null: from the weights' position embeddings, else vision_arch's (224)
    num_query_tokens: Optional[int] = None  # null: from the weights' query_tokens, else vision_arch's (32)
    placeholder_token: Optional[str] = None  # image placeholder; None = <|extra_0|> for Qwen, else chosen per family
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention (packed training, GPU)
    trainable: TrainableParts = field(default_factory=TrainableParts)
    dtypes: PartDtypes = field(
        default_factory=lambda: PartDtypes(vision_model="bf16", qformer="fp32", query_tokens="fp32",
                                           language_projection="fp32", language_model="bf16")
    )
    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    compile_blocks: bool = False  # torch.compile each ViT and LLM block (GPU: +35% training throughput at 7B)
    # int8 | int4: the LLM's Linear weights quantized by torchao while they load (model/quantization.py); the LLM
    # must be frozen (int8 passes gradients to the projection; int4 is inference only)
    quantize: Optional[str] = None
    # true: training runs the matmuls of the LLM blocks' Linear layers (forward and gradient to their inputs) in
    # float8 with torchao (model/float8.py): Ada/Hopper GPUs (sm_89+) only, not with quantize; pair it with
    # compile_blocks=true, which fuses the casts. A trainable LLM's weight gradients are float8 matmuls too.
    # Weights stay bf16; inference and export ignore it
    float8: bool = False
    # true (with float8 and a frozen LLM): each frozen block weight is cast to float8 once and stored so, its bf16
    # copy dropped (model/float8_weights.py): the same matmuls, half the LLM blocks' memory. The DDP engine only;
    # training then saves the trained parts (train.save_contents=trainable)
    float8_weights: bool = False


def load_config(path: str | Path | None, overrides: list[str] | None, schema: type[T]) -> T:
    """Reads a YAML file (optional) onto a dataclass schema and applies `key.sub=value` overrides.

    Args:
        path: YAML file, or None for the schema's defaults.
        overrides: dotted `key=value` strings (values parsed as YAML scalars; never evaluated as code).
        schema: the dataclass type describing the config.

    Returns:
        An instance of `schema` (a typed omegaconf object; use `to_plain` for a plain dataclass).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: an unknown key, a wrong type, or a malformed override (the message names the key).
    """
    base = OmegaConf.structured(schema)
    layers: list[Any] = [base]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. run.max_steps=100)")
        layers.append(OmegaConf.from_dotlist([item]))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = f" in {path}" if path else ""
        raise ValueError(f"invalid config{where}: {err}".replace("\n", " ")) from None


def to_yaml(config: Any) -> str:
    """The config as YAML text (saved beside checkpoints so a run documents itself)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
