"""Paths of the reference files the tests read, kept in the repository (see tests/data/PROVENANCE.md).

Tests never read anything outside the repository: a plain clone passes on its own.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
QWEN7B_DIR = DATA / "qwen7b"          # a real Qwen-7B(-Chat) directory minus weights and remote code
MANIFESTS = DATA / "manifests"        # key -> shape lists of the real checkpoints
LLMS = DATA / "llms"                  # published config.json + chat template and added tokens, per preset LLM
