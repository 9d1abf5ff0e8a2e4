"""The embedded demo: a coloured-shapes visual question-answering task that trains a tiny model on the CPU."""

from minigpt4qwen.demo.run import run

__all__ = ["run"]
