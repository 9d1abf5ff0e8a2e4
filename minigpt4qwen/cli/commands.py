"""Subcommand definitions: each `add_*` registers arguments and binds a function that does the work."""

from __future__ import annotations

import argparse


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tiny embedded demo model on the CPU and answer a question")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from minigpt4qwen.demo import run

    return run(args)


REGISTER = [add_demo]
