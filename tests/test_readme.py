"""Every command the README shows is one the CLI accepts: the README is checked, not trusted.

Each `minigpt4qwen ...` / `torchrun ... -m minigpt4qwen.cli.main ...` line of its bash blocks is parsed by the
real argument parser; the training-config commands (`train`, `export`, `data check`) also load and validate their
YAML with its overrides as the command would (at the launcher's process count), so a config error such as a
ZeRO recipe with fp32 parts is caught here; `python -m benchmarks.X` names a module that exists. The README's
first command (set up + demo) and second (tests) are run by CI itself.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from minigpt4qwen.cli.main import build_parser
from minigpt4qwen.config import load_config
from minigpt4qwen.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_COMMANDS = {("train",), ("export",), ("data", "check")}


def readme_commands() -> list[str]:
    """Every shell command in the README's bash blocks (comments dropped, `&&` chains split)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def cli_argv(command: str) -> tuple[list[str], int] | None:
    """The `minigpt4qwen` arguments of a command and its process count, or None for other programs."""
    words = shlex.split(command)
    if Path(words[0]).name == "minigpt4qwen":
        return words[1:], 1
    if words[0] == "torchrun":
        start = words.index("minigpt4qwen.cli.main") + 1
        nproc = int(next((w.split("=")[1] for w in words if w.startswith("--nproc_per_node=")),
                         words[words.index("--nproc_per_node") + 1] if "--nproc_per_node" in words else 1))
        return words[start:], nproc
    return None


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_a_user_needs():
    argvs = [cli_argv(c) for c in COMMANDS]
    shown = {a[0][0] for a in argvs if a}
    assert {"demo", "train", "export", "chat", "webui", "serve", "generate", "data"} <= shown
    assert any(c.endswith("python -m pytest -q") for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if cli_argv(c)])
def test_cli_command_parses_and_its_config_validates(command, monkeypatch):
    argv, nproc = cli_argv(command)
    args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown option or subcommand
    path = ROOT / args.config if getattr(args, "config", None) else None
    if tuple(argv[:2]) in CONFIG_COMMANDS or tuple(argv[:1]) in CONFIG_COMMANDS:
        assert path is not None and path.is_file(), f"{command}: no config file {args.config}"
        cfg = load_config(path, args.overrides, RunConfig)
        cfg.validate()
        cfg.parallel.validate(nproc)
    elif path is not None:
        assert path.is_file(), f"{command}: no config file {args.config}"


def test_benchmark_modules_exist():
    for command in COMMANDS:
        if found := re.search(r"python3? -m (benchmarks\.\w+)", command):
            assert (ROOT / (found.group(1).replace(".", "/") + ".py")).is_file(), command
