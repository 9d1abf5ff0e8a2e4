"""A thin terminal front end over `ChatSession`: enter image paths, then chat; streamed output.

Commands: :help  :q  :clear (history + images)  :clh (history only)  :his  :img PATH  :seed N
"""

from __future__ import annotations

import argparse
import dataclasses
import threading

import torch
from transformers import TextIteratorStreamer

from minigpt4qwen.data.images import ImageLoadError
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings

HELP = """commands:
  :help / :h            this help
  :q / :quit / :exit    leave
  :clear / :cl          forget the history and the images
  :clear-history / :clh forget the history, keep the images
  :history / :his       show the history
  :img PATH             add an image for the next question
  :seed [N]             show or set the sampling seed
anything else is a question about the images added so far."""


def _load(args: argparse.Namespace):
    from minigpt4qwen.checkpoint.assemble import build_model
    from minigpt4qwen.config import ModelConfig, load_config
    from minigpt4qwen.model.parts import PartDtypes, TrainableParts
    from minigpt4qwen.training.config import RunConfig

    if args.config:
        model_cfg = load_config(args.config, [], RunConfig).model
    else:
        model_cfg = ModelConfig(preset=args.model_type, cache_root=args.cache_root)
    frozen = TrainableParts(language_projection=False)
    dtypes = PartDtypes.uniform("fp32") if args.cpu_only else model_cfg.dtypes
    model_cfg = dataclasses.replace(model_cfg, checkpoint=args.checkpoint or model_cfg.checkpoint,
                                    trainable=frozen, dtypes=dtypes)
    device = "cpu" if args.cpu_only or not torch.cuda.is_available() else "cuda"
    return build_model(model_cfg, device=device)


def _answer(session: ChatSession, query: str, settings: GenerationSettings) -> str:
    streamer = TextIteratorStreamer(session.tokenizer, skip_prompt=False, skip_special_tokens=True)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(reply=session.ask(query, settings, streamer)))
    worker.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    worker.join()
    print()
    return result.get("reply", "")


def chat_main(args: argparse.Namespace) -> int:
    """Runs the chat loop (or one `--query`)."""
    model, tokenizer = _load(args)
    session = ChatSession(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    for path in args.image:
        session.add_image(path)
    if args.query:
        _answer(session, args.query, settings)
        return 0
    print(HELP)
    while True:
        try:
            line = input("User> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in (":q", ":quit", ":exit"):
            return 0
        if command in (":h", ":help"):
            print(HELP)
        elif command in (":cl", ":clear"):
            session.clear()
        elif command in (":clh", ":clear-history"):
            session.clear_history()
        elif command in (":his", ":history"):
            for user, reply in session.turns:
                print(f"User: {user}\nAssistant: {reply}")
        elif command == ":img":
            try:
                session.add_image(rest.strip())
                print(f"added {rest.strip()}")
            except ImageLoadError as err:
                print(f"could not add the image: {err}")
        elif command == ":seed":
            if rest.strip().isdigit():
                settings = dataclasses.replace(settings, seed=int(rest))
            elif rest.strip():
                print("usage: :seed N (a non-negative integer)")
            print(f"seed: {settings.seed}")
        else:
            try:
                _answer(session, line, settings)
            except KeyboardInterrupt:
                print("\n(interrupted)")
