"""Start-up hygiene: the front ends start without advice that would break the user's install."""

from __future__ import annotations

import argparse
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


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_s_help_renders():
    # argparse formats help texts with %: a bare "80% of" in one option's help made `serve --help` (and webui's,
    # generate's) crash with a TypeError instead of printing.
    from minigpt4qwen.cli.main import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        assert parser.format_help()


def test_a_command_s_output_carries_no_import_noise(tmp_path):
    # Importing transformers imports torchao when it is installed, and torch and torchao then log warnings about
    # kernels for other hardware and a deprecation on every start; the CLI drops those three (shown with -v).
    command = [sys.executable, "-m", "minigpt4qwen.cli.main", "chat", "--model-dir", str(tmp_path / "none")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no config.json" in done.stderr, done.stderr[-2000:]
    noise = ("Failed to load", "is an Enum subclass", "Detected no triton")
    assert [line for line in done.stderr.splitlines() if any(n in line for n in noise)] == [], done.stderr[-2000:]
