"""minigpt4qwen: BLIP-2's frozen vision stack connected to a chat LLM by one trained projection.

The model is built from `transformers` classes (Blip2VisionModel, Blip2QFormerModel, any causal LM), loads the
original MiniGPT4Qwen checkpoints, and exports to a plain `Blip2ForConditionalGeneration` directory.
"""

__version__ = "0.1.0"
