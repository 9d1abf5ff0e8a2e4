"""Start-up hygiene: the front ends start without advice that would break the user's install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_torchvision_warning_at_start_or_export(tmp_path):
    # transformers warns "Install torchvision" when the torchvision-backed BlipImageProcessor is touched without
    # it; with the CPU torch most users have here, torchvision breaks the install. Import every front end, export
    # a tiny model and load it the way `chat --model-dir` does, in a fresh process, and read its stderr.
    script = f"""
import minigpt4qwen.cli.main, minigpt4qwen.inference.frontends.webui, minigpt4qwen.inference.frontends.openai_api.server
import minigpt4qwen.inference.frontends.batch
from minigpt4qwen.checkpoint.export import export_hf, load_exported
from tests.conftest import make_tiny_chat_model
model, tokenizer = make_tiny_chat_model()
export_hf(model, tokenizer, {str(tmp_path / "export")!r})
load_exported({str(tmp_path / "export")!r})
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert "torchvision" not in done.stderr, done.stderr[-2000:]
