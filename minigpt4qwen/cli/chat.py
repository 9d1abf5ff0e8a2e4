"""The terminal chat over `ChatSession`: enter image paths (`:f` to finish), then chat with streamed replies.

The original `cli_demo.py`'s flow and commands (`:h` lists them), with settings parsed safely instead of eval'd,
images addable at any turn, Ctrl-C stopping only the reply being generated, line editing and input history
(readline) in a terminal, questions over the prompt budget refused with a note, and `--query` for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import threading
from typing import TextIO

from transformers import TextIteratorStreamer

from minigpt4qwen.cli.chat_text import (
    ASSISTANT,
    CONF_ITEM_START,
    HELP,
    IMAGE_INPUT,
    USER,
    WELCOME,
    conf_value,
    read_line,
    unquote,
)
from minigpt4qwen.data.images import ImageLoadError, load_image
from minigpt4qwen.inference.engine import ChatSession, GenerationCancelled, GenerationSettings
from minigpt4qwen.inference.loading import fast_decoder, load_for_inference, settings_from_args
from minigpt4qwen.inference.prompt_budget import over_budget


class ChatCLI:
    """The command loop around one `ChatSession`.

    Args:
        session: the conversation.
        settings: the starting generation settings (`:reset-conf` restores them).
        notes: where image and error notes go (stderr keeps a `--query` answer alone on stdout).
    """

    def __init__(self, session: ChatSession, settings: GenerationSettings, notes: TextIO | None = None) -> None:
        self.session = session
        self.notes = notes or sys.stdout
        self.initial_settings = self.settings = settings
        self.image_paths: list[str] = []  # in the order added; the last len(pending_images) are pending

    def add_image(self, path: str) -> bool:
        """Adds an image for the next question, or prints why it cannot be read.

        Args:
            path: the image file.

        Returns:
            Whether it was added.
        """
        try:
            self.session.add_image(path)
        except ImageLoadError as err:
            print(f"[ERROR] cannot use this image (无法读取该图片): {err}", file=self.notes)
            return False
        self.image_paths.append(path)
        print(f"[INFO] image {len(self.image_paths)} added (已添加图片): {path}", file=self.notes)
        return True

    def collect_images(self) -> bool:
        """The original's first step: image paths one per line until `:f`.

        Returns:
            False when the user leaves (`:q` or end of input) instead.
        """
        while (line := read_line(IMAGE_INPUT)) is not None:
            if line == ":f":
                print(f"[INFO] {len(self.image_paths)} image(s); now ask your question (图片输入结束，开始对话)")
                return True
            if line in (":q", ":quit", ":exit"):
                return False
            if line:
                self.add_image(unquote(line))
            else:
                print("[ERROR] empty path; type :f to finish (路径为空，输入 :f 结束)")
        return False

    def answer(self, query: str, label: str = ASSISTANT) -> bool:
        """Streams the reply to `query`; Ctrl-C stops it (nothing is added to the history).

        Args:
            query: the question.
            label: printed before the reply.

        Returns:
            Whether a reply was completed (False: refused as over the prompt budget, interrupted or failed,
            with a note printed).
        """
        if problem := over_budget(self.session, query):
            print(f"[ERROR] {problem} (问题过长，未发送)", file=self.notes)
            return False
        streamer = TextIteratorStreamer(self.session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["reply"] = self.session.ask(query, self.settings, streamer)
            except Exception as err:  # reported by the main thread, which owns the terminal
                outcome["error"] = err

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            print(label, end="", flush=True)
            for piece in streamer:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            self.session.cancel()
        while worker.is_alive():  # Ctrl-C again while the generation winds down: keep waiting
            try:
                worker.join()
            except KeyboardInterrupt:
                self.session.cancel()
        print()
        error = outcome.get("error")
        if isinstance(error, GenerationCancelled):
            print("[WARNING] generation interrupted (生成已中断)", file=self.notes)
        elif error is not None:
            print(f"[ERROR] {error}", file=self.notes)
        return error is None

    def run(self) -> None:
        """Reads commands and questions until `:q` or end of input. Ctrl-C or a failure inside a command (an image
        being encoded, say) is reported and the conversation goes on."""
        print(WELCOME)
        while (line := read_line(USER)) is not None:
            try:
                if not line:
                    print("[ERROR] empty question (输入为空)")
                elif not line.startswith(":"):
                    self.answer(line)
                elif not self.command(line[1:]):
                    return
            except KeyboardInterrupt:
                print("\n[INFO] interrupted; the conversation is kept (已中断，对话保留)", file=self.notes)
            except Exception as err:  # e.g. out of memory while encoding an image: the history is still there
                print(f"[ERROR] {err}", file=self.notes)

    def command(self, text: str) -> bool:
        """Runs one command.

        Args:
            text: the command line without its colon, e.g. "conf temperature=0.7".

        Returns:
            False when the command is to leave.
        """
        name, _, rest = text.strip().partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "q"):
            return False
        if name in ("help", "h"):
            print(HELP)
        elif name in ("clear", "cl"):  # the screen only, as in the original
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(WELCOME)
        elif name == "new":
            self.session.clear()
            self.image_paths = []
            print("[INFO] history and images cleared (对话历史和图片已清除)")
        elif name in ("clear-history", "clear-his", "clh"):
            count = len(self.session.turns)
            self.session.clear_history()
            print(f"[INFO] all {count} turn(s) of history cleared; images kept (已清除 {count} 轮对话历史，图片保留)")
        elif name in ("history", "his"):
            self._print_history()
        elif name == "seed":
            self._seed(rest)
        elif name == "conf":
            self._conf(rest)
        elif name == "reset-conf":
            self.settings = dataclasses.replace(self.initial_settings, seed=self.settings.seed)
            print("[INFO] generation settings reset (生成配置已重置)")
            self._print_settings()
        elif name == "img":
            self._img(rest)
        else:
            print(f"[WARNING] unknown command :{name}; :h lists the commands (未知命令，:h 显示帮助)")
        return True

    def _print_history(self) -> None:
        width = shutil.get_terminal_size()[0]
        print(f" History ({len(self.session.turns)}) ".center(width, "="))
        for index, (query, reply) in enumerate(self.session.turns):
            print(f"User[{index}]: {query}")
            print(f"Assistant[{index}]: {reply}")
        print("=" * width)

    def _seed(self, rest: str) -> None:
        if rest:
            try:
                self.settings = self.settings.with_text("seed", rest)
            except ValueError as err:
                print(f"[WARNING] seed not changed (随机种子未修改): {err}")
                return
        print(f"[INFO] random seed (随机种子): {self.settings.seed}")

    def _print_settings(self) -> None:
        for field in dataclasses.fields(self.settings):
            print(f"    {field.name} = {getattr(self.settings, field.name)!r}")

    def _conf(self, rest: str) -> None:
        # Items begin where a word followed by "=" begins: values keep their spaces, quotes and backslashes (shell
        # splitting would turn stop=\n into stop=n and a JSON list into a bare one).
        items = CONF_ITEM_START.split(rest.strip()) if rest.strip() else []
        if not items:
            self._print_settings()
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                print(f"[WARNING] {item!r}: format is key=value (格式应为 key=value)")
                continue
            try:
                self.settings = self.settings.with_text(key.strip(), conf_value(value))
            except ValueError as err:
                print(f"[WARNING] not changed (未修改): {err}")
                continue
            print(f"[INFO] {key.strip()} = {getattr(self.settings, key.strip())!r}")

    def _img(self, rest: str) -> None:
        if rest:
            self.add_image(unquote(rest))
            return
        pending = len(self.image_paths) - len(self.session.pending_images)
        print(f"[INFO] images (图片): {len(self.image_paths)}")
        for index, path in enumerate(self.image_paths):
            print(f"    [{index}] {path}{' (for the next question 待提问)' if index >= pending else ''}")


def chat_main(args: argparse.Namespace) -> int:
    """Runs the chat: `--query` answers once (streamed to stdout) and exits; otherwise the interactive loop.

    Args:
        args: the `chat` subcommand's options (model, generation, --image, --query, --system-prompt, ...).

    Returns:
        The exit code: 0; with `--query`, 1 when the reply failed and 2 when an `--image` cannot be read.

    Raises:
        ValueError / FileNotFoundError: invalid settings or model options (reported by the CLI's main).
    """
    settings = settings_from_args(args)
    if args.query is not None:  # a script's typo should not cost a model load
        try:
            for path in args.image:
                load_image(path)
        except ImageLoadError as err:
            print(f"[ERROR] cannot use this image (无法读取该图片): {err}", file=sys.stderr)
            return 2
    model, tokenizer = load_for_inference(args)
    system = {"system_prompt": args.system_prompt} if args.system_prompt is not None else {}
    session = ChatSession(model, tokenizer, max_window_size=args.max_window_size, decoder=fast_decoder(model, args),
                          **system)
    cli = ChatCLI(session, settings, notes=sys.stderr if args.query is not None else sys.stdout)
    for path in args.image:
        cli.add_image(path)
    if args.query is not None:
        return 0 if cli.answer(args.query, label="") else 1
    if sys.stdin.isatty():
        # input() then edits lines (arrow keys, history) and reads them whole: without it the terminal's own
        # line editing is in charge, which cuts a line at 4095 characters without a word.
        import readline  # noqa: F401

        # Ctrl-C stops a reply (KeyboardInterrupt), also when a parent started us with SIGINT ignored (a
        # background job of a script): Python keeps an inherited "ignore" and Ctrl-C would do nothing.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not args.image and not cli.collect_images():
        return 0
    cli.run()
    return 0
