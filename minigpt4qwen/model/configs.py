"""Architecture configs: EVA ViT-g, the BLIP-2 Q-Former, and the composite `Blip2Config` MiniGPT4Qwen uses.

The composite is a plain `transformers.Blip2Config` (vision + Q-Former + any causal-LM text config, with
`image_token_id` = the placeholder), so an exported model loads as `Blip2ForConditionalGeneration`.
"""

from __future__ import annotations

from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, PretrainedConfig

# MiniGPT4Qwen's ln_vision is nn.LayerNorm's default eps; the 39 EVA block norms use 1e-6. transformers has one
# field for both, so the composite stores this extra attribute and the model re-applies it after construction.
LN_VISION_EPS = 1e-5
NUM_QUERY_TOKENS = 32
# Blip2VisionConfig's default initializer_range is 1e-10, i.e. an all-but-zero random init of every ViT weight:
# harmless when real weights are loaded, but a ViT trained from scratch (the CPU demo) could never learn.
VISION_INIT_STD = 0.02


def eva_vit_g_config(image_size: int = 224) -> Blip2VisionConfig:
    """EVA ViT-g/14 as LAVIS builds it (width 1408, depth 39, 16 heads, fc1 6144 = int(1408 * 4.3637))."""
    return Blip2VisionConfig(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        attention_dropout=0.0,
        initializer_range=VISION_INIT_STD,
    )


def blip2_qformer_config(encoder_hidden_size: int = 1408) -> Blip2QFormerConfig:
    """The BLIP-2 Q-Former (bert-base sizes, cross-attention every 2nd layer, no text input)."""
    return Blip2QFormerConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        cross_attention_frequency=2,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=False,
    )


def minigpt4qwen_config(
    text_config: PretrainedConfig,
    *,
    image_token_id: int,
    vision_config: Blip2VisionConfig | None = None,
    qformer_config: Blip2QFormerConfig | None = None,
    num_query_tokens: int = NUM_QUERY_TOKENS,
    ln_vision_eps: float = LN_VISION_EPS,
) -> Blip2Config:
    """The whole model's architecture as a `Blip2Config`.

    Args:
        text_config: the LLM's config (e.g. a `Qwen2Config` converted from Qwen-7B-Chat).
        image_token_id: the placeholder token whose embeddings are replaced by image features.
        vision_config: defaults to EVA ViT-g at 224 px.
        qformer_config: defaults to the BLIP-2 Q-Former; its `encoder_hidden_size` must equal the ViT width.
        num_query_tokens: learned queries per image (= placeholder tokens per image).
        ln_vision_eps: eps of the LayerNorm after the ViT (stored as an extra config attribute).
    """
    vision_config = vision_config or eva_vit_g_config()
    qformer_config = qformer_config or blip2_qformer_config(vision_config.hidden_size)
    if qformer_config.encoder_hidden_size != vision_config.hidden_size:
        raise ValueError(f"Q-Former encoder_hidden_size {qformer_config.encoder_hidden_size} != ViT width "
                         f"{vision_config.hidden_size}")
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_id=image_token_id,
        use_decoder_only_language_model=True,
    )
    config.ln_vision_eps = ln_vision_eps
    return config


def tiny_vision_config(image_size: int = 28) -> Blip2VisionConfig:
    """A few-kilobyte EVA-shaped vision tower for tests and the CPU demo."""
    return Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=7,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        attention_dropout=0.0,
        initializer_range=VISION_INIT_STD,
    )


def tiny_qformer_config(encoder_hidden_size: int = 32) -> Blip2QFormerConfig:
    """A tiny Q-Former (2 layers, cross-attention in layer 0) matching `tiny_vision_config`."""
    return Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
        cross_attention_frequency=2,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=False,
    )


def vision_preset(name: str) -> tuple[Blip2VisionConfig, Blip2QFormerConfig, int]:
    """The named vision side `ModelConfig.vision_arch` selects: (ViT config, Q-Former config, query count).

    A preset supplies what neither the config nor the weights give (attention heads, norm eps, activation) and
    every size when there are no weights to read (see `checkpoint/vision_sizes.py`).

    Args:
        name: `eva_vit_g` (LAVIS's EVA ViT-g at 224 px and the Q-Former LAVIS builds from bert-base-uncased's
            config) or `tiny` (the tests' and the CPU demo's tower).

    Raises:
        ValueError: an unknown name.
    """
    if name == "eva_vit_g":
        vision = eva_vit_g_config()
        return vision, blip2_qformer_config(vision.hidden_size), NUM_QUERY_TOKENS
    if name == "tiny":
        vision = tiny_vision_config()
        return vision, tiny_qformer_config(vision.hidden_size), NUM_QUERY_TOKENS
    raise ValueError(f"unknown model.vision_arch {name!r}; use eva_vit_g or tiny")


def tiny_qwen2_config(vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2) -> PretrainedConfig:
    """A tiny Qwen2-architecture LLM config (the architecture Qwen-7B/14B-Chat are converted to)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
