"""The demo's recipe: the tiny model, its data settings and its training schedule, in one place.

Every number here was chosen by measuring held-out accuracy over several seeds within the demo's CPU budget
(README, "The demo"); `Recipe` gathers them so a shortened run (tests) changes only what it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt4qwen.data.config import DataConfig, DatasetSpec
from minigpt4qwen.model.configs import minigpt4qwen_config, tiny_qformer_config, tiny_qwen2_config, tiny_vision_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.model.parts import TrainableParts
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT
from minigpt4qwen.training.config import LrMultipliers, TrainConfig


@dataclass(frozen=True)
class Recipe:
    """What the demo's result depends on besides the seed.

    Attributes:
        steps: optimizer steps.
        batch_size: questions per optimizer step.
        train_images, heldout_images: pictures drawn per split.
        questions_per_image: training questions asked about each picture (the held-out set asks all six).
        image_size, patch_size: the pictures' side and the vision tower's patch side, in pixels.
        width: hidden size of the vision tower, the Q-Former and the LLM.
        vision_layers, qformer_layers, llm_layers: depths.
        num_queries: learned queries (image placeholder tokens per picture).
        lr, min_lr, warmup: AdamW's peak and final learning rates; warmup steps as a fraction of `steps`.
        beta2: AdamW's second-moment decay.
        qformer_lr: the Q-Former's and the queries' learning rate relative to `lr`.
    """

    steps: int = 2500
    batch_size: int = 32
    train_images: int = 1200
    heldout_images: int = 150
    questions_per_image: int = 2
    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    vision_layers: int = 2
    qformer_layers: int = 2
    llm_layers: int = 2
    num_queries: int = 8
    lr: float = 2e-3
    min_lr: float = 6e-5
    warmup: float = 0.25
    beta2: float = 0.98
    qformer_lr: float = 0.25

    def check(self) -> Recipe:
        """Raises ValueError, naming the demo option to change, for values no run can use; returns self."""
        if self.steps < 1:
            raise ValueError(f"--steps must be a positive number of optimizer steps (the demo's default is "
                             f"{Recipe.steps}), not {self.steps}")
        needed = -(-self.batch_size // self.questions_per_image)  # pictures that fill one batch
        if self.train_images < needed:
            raise ValueError(f"--train-images must be at least {needed} (one batch of {self.batch_size} questions, "
                             f"{self.questions_per_image} per picture; the demo's default is {Recipe.train_images}), "
                             f"not {self.train_images}")
        return self


def build_model(recipe: Recipe, vocab_size: int, image_token_id: int, seed: int) -> MiniGPT4Qwen:
    """The tiny MiniGPT4Qwen of `recipe`, every part trainable, initialised from `seed`."""
    torch.manual_seed(seed)
    width = recipe.width
    vision = tiny_vision_config(image_size=recipe.image_size)
    vision.patch_size, vision.hidden_size, vision.intermediate_size = recipe.patch_size, width, 2 * width
    vision.num_hidden_layers = recipe.vision_layers
    qformer = tiny_qformer_config(encoder_hidden_size=width)
    qformer.hidden_size, qformer.intermediate_size = width, 2 * width
    qformer.num_hidden_layers = recipe.qformer_layers
    # A Q-Former trained from scratch (the real one starts from BERT + BLIP-2 pre-training) needs to see the
    # image in every layer and no dropout to learn within a CPU budget (measured: cross-attention in 1 of 2
    # layers lost the colour entirely).
    qformer.cross_attention_frequency = 1
    qformer.hidden_dropout_prob = qformer.attention_probs_dropout_prob = 0.0
    llm = tiny_qwen2_config(vocab_size=vocab_size, hidden_size=width, num_layers=recipe.llm_layers)
    config = minigpt4qwen_config(llm, image_token_id=image_token_id, vision_config=vision, qformer_config=qformer,
                                 num_query_tokens=recipe.num_queries)
    model = MiniGPT4Qwen(config)
    model.set_trainable(TrainableParts.all())
    return model


def data_config(recipe: Recipe, annotation: Path, image_root: Path) -> DataConfig:
    """The data layer's settings for one split of the demo's set."""
    # No random crop (it could cut a shape off and change the count); flips keep every answer. The chat front
    # ends' default system prompt, so that the exported model answers them as it was trained.
    spec = DatasetSpec(format="minigpt4qwen", annotation=str(annotation), image_root=str(image_root))
    return DataConfig(datasets=[spec], image_size=recipe.image_size, min_scale=1.0, max_scale=1.0, max_txt_len=128,
                      system_prompt=DEFAULT_SYSTEM_PROMPT, num_workers=0)


def train_config(recipe: Recipe, seed: int, output_dir: Path, progress_bar: bool) -> TrainConfig:
    """The trainer's settings: fp32 AdamW, linear warm-up then cosine decay, one checkpoint kept."""
    # The post-LayerNorm Q-Former learns best at a fraction of the others' learning rate (measured on this task).
    multipliers = LrMultipliers(qformer=recipe.qformer_lr, query_tokens=recipe.qformer_lr)
    return TrainConfig(lr=recipe.lr, min_lr=recipe.min_lr, warmup_steps=max(round(recipe.steps * recipe.warmup), 1),
                       betas=[0.9, recipe.beta2], weight_decay=0.01, max_steps=recipe.steps, lr_multipliers=multipliers,
                       micro_batch_size=recipe.batch_size, grad_accum=1, precision="fp32", seed=seed,
                       output_dir=str(output_dir), keep_last=1, resume="none", log_every=25, tensorboard=False,
                       progress_bar=progress_bar)
