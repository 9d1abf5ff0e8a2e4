"""The `minigpt4qwen` command: one CLI of subcommands over plain functions.

Run `minigpt4qwen --help` for the list; each subcommand has its own `--help`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from minigpt4qwen.cli import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt4qwen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.REGISTER:
        register(sub)
    return parser


class _ImportNoise(logging.Filter):
    """Drops the warnings that importing transformers (which imports torchao when it is installed) logs on every
    start and that say nothing about the user's run: torchao's optional kernels for other hardware that this build
    cannot load ("Failed to load .../torchao/_C_mxfp8...so"), its note that kernels needing Triton (GPU kernels)
    will not work on a machine without it, and torch's deprecation notice about how torchao registers its enums.
    Shown with -v."""

    NOISE = (("Failed to load", "torchao"), ("Detected no triton",), ("is an Enum subclass and is now natively",))
    LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(all(part in message for part in parts) for parts in self.NOISE)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in _ImportNoise.LOGGERS:
            logging.getLogger(name).addFilter(_ImportNoise())
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        # Bad input from the user: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
