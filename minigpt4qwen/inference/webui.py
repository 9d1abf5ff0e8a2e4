"""A gradio web UI over `ChatSession`: upload images, chat with streamed replies, tune decoding, regenerate.

    launch(model, tokenizer, port=7860)   # then open http://127.0.0.1:7860

Each browser tab has its own session (images are encoded once, on upload); generations on the one model run one
at a time, and a reply stops when its tab goes away.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.images import ImageLoadError
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.graph_decoder import GraphDecoder
from minigpt4qwen.inference.streaming import Action, ReplyStream
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

TITLE = "MiniGPT4Qwen"
INTRO = ("Upload one or several images (or none), ask, and the answer streams in. Images uploaded after a question "
         "belong to the next one. **Restart** forgets everything; **Clear history** keeps the images.")
_DEFAULTS = GenerationSettings()
Chat = list[dict[str, Any]]  # the chatbot's messages


@dataclass
class _Tab:
    """What one browser tab holds: its session and the messages on its screen."""

    session: ChatSession
    chat: list[dict[str, Any]] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)


def _settings(do_sample: bool, num_beams: float, temperature: float, top_k: float, top_p: float,
              max_new_tokens: float, seed: str) -> GenerationSettings:
    """The controls' values (sliders give floats; the seed is text, empty for none) as checked settings.

    Raises:
        ValueError: a seed that is not a whole number, or a value out of range.
    """
    if seed.strip() and not seed.strip().isdigit():
        raise ValueError(f"seed must be a whole number >= 0 (or empty), got {seed.strip()!r}")
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
        top_p=float(top_p), top_k=int(top_k), num_beams=int(num_beams), seed=int(seed) if seed.strip() else None,
    ).check()


def build_app(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
              max_window_size: int = 6144, decoder: GraphDecoder | None = None) -> gr.Blocks:
    """Builds the web UI for `model`.

    Args:
        model: the model (one generation at a time runs on it).
        tokenizer: its tokenizer.
        system_prompt: the system message of every conversation.
        max_window_size: prompt budget in tokens; older turns are dropped beyond it.
        decoder: the model's CUDA-graph decoder (see `ChatSession`), or None.

    Returns:
        The gradio app (call `.launch()`, or use `launch`).
    """
    lock = threading.Lock()  # the model's: uploads encode with it, replies generate with it

    def new_tab() -> _Tab:
        return _Tab(ChatSession(model, tokenizer, system_prompt=system_prompt, max_window_size=max_window_size,
                                decoder=decoder))

    def upload(files: list[str] | None, tab: _Tab | None) -> tuple[None, Chat, _Tab]:
        tab = tab or new_tab()
        for path in files or []:
            try:
                with lock:
                    tab.session.add_image(path)
            except ImageLoadError as err:
                gr.Warning(f"{Path(path).name} was not added: {err.kind.replace('_', ' ')}")
                continue
            tab.image_paths.append(path)
            tab.chat.append({"role": "user", "content": {"path": path}})
        return None, list(tab.chat), tab

    def checked(controls: tuple) -> GenerationSettings | None:
        try:
            return _settings(*controls)
        except ValueError as err:
            gr.Warning(str(err))
            return None

    def stream(tab: _Tab, action: Action, settings: GenerationSettings) -> Iterator[tuple[Any, Chat, _Tab]]:
        """Streams a reply into the last chat message (an empty assistant one)."""
        reply = ""
        try:
            for piece in ReplyStream(lambda: tab.session, action, settings, lock=lock):
                reply += piece
                tab.chat[-1] = {"role": "assistant", "content": reply}
                yield gr.update(), list(tab.chat), tab
        except (ValueError, RuntimeError) as err:
            gr.Warning(f"generation failed: {err}")
        tab.chat[-1] = {"role": "assistant", "content": reply or "(no answer)"}
        yield gr.update(), list(tab.chat), tab

    def ask(text: str, tab: _Tab | None, *controls: Any) -> Iterator[tuple[Any, Chat, _Tab | None]]:
        settings = checked(controls)
        if not text.strip() or settings is None:
            if settings is not None:
                gr.Warning("Type a question first.")
            yield gr.update(), gr.update(), tab
            return
        tab = tab or new_tab()
        tab.chat += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield "", list(tab.chat), tab
        yield from stream(tab, lambda session, options, streamer: session.ask(text, options, streamer), settings)

    def regenerate(tab: _Tab | None, *controls: Any) -> Iterator[tuple[Any, Chat, _Tab | None]]:
        settings = checked(controls)
        if tab is None or not tab.session.turns or settings is None:
            if settings is not None:
                gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield gr.update(), gr.update(), tab
            return
        # Images uploaded since the last answer stay below it, pending for the next question.
        last = max(i for i, message in enumerate(tab.chat) if message["role"] == "assistant")
        later, tab.chat = tab.chat[last + 1:], tab.chat[:last] + [{"role": "assistant", "content": ""}]
        yield gr.update(), list(tab.chat), tab
        try:
            yield from stream(tab, lambda session, options, streamer: session.regenerate(options, streamer),
                              settings)
        finally:
            tab.chat += later
        yield gr.update(), list(tab.chat), tab

    def clear_history(tab: _Tab | None) -> tuple[Chat, _Tab | None]:
        if tab is not None:
            tab.session.clear_history()
            tab.chat = [{"role": "user", "content": {"path": path}} for path in tab.image_paths]
        return (list(tab.chat) if tab else []), tab

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        tab_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                images = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                 elem_id="images")
                do_sample = gr.Checkbox(_DEFAULTS.do_sample, label="do_sample (off: greedy, or beam search with "
                                        "num_beams > 1; temperature, top_k and top_p act only when on)",
                                        elem_id="do-sample")
                num_beams = gr.Slider(1, 10, _DEFAULTS.num_beams, step=1, label="num_beams", elem_id="num-beams")
                temperature = gr.Slider(0.1, 2.0, _DEFAULTS.temperature, step=0.05, label="temperature",
                                        elem_id="temperature")
                top_k = gr.Slider(0, 100, _DEFAULTS.top_k, step=1, label="top_k (0: off)", elem_id="top-k")
                top_p = gr.Slider(0.05, 1.0, _DEFAULTS.top_p, step=0.05, label="top_p", elem_id="top-p")
                max_new_tokens = gr.Slider(1, 2048, _DEFAULTS.max_new_tokens, step=1, label="max new tokens",
                                           elem_id="max-new-tokens")
                # A textbox, not gr.Number: "not reseeded" must be expressible, and Number shows/sends 0 for None.
                seed = gr.Textbox("", label="seed (empty: not reseeded)", elem_id="seed")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label=TITLE, height=520, elem_id="chatbot")
                query = gr.Textbox(label="Question", placeholder="Ask about the images, then press Enter",
                                   elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear history", elem_id="clear-history")
                    restart = gr.Button("Restart", elem_id="restart")
        controls = [do_sample, num_beams, temperature, top_k, top_p, max_new_tokens, seed]
        # One queue for everything that runs the model, so the UI shows waiting users their place in line.
        model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
        images.upload(upload, [images, tab_state], [images, chatbot, tab_state], **model_queue)
        replies = [trigger(ask, [query, tab_state, *controls], [query, chatbot, tab_state], **model_queue)
                   for trigger in (query.submit, send.click)]
        replies.append(again.click(regenerate, [tab_state, *controls], [query, chatbot, tab_state], **model_queue))
        clear.click(clear_history, [tab_state], [chatbot, tab_state], cancels=replies)
        # Cancelling a reply closes its generator, and closing a ReplyStream stops the generation.
        restart.click(lambda: (None, [], None, ""), None, [images, chatbot, tab_state, query], cancels=replies)
        chatbot.clear(lambda: (None, None, ""), None, [images, tab_state, query], cancels=replies)  # its bin icon
    return app


def launch(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_window_size: int = 6144,
           decoder: GraphDecoder | None = None, **launch_kwargs: Any) -> None:
    """Serves the web UI until interrupted (binds 127.0.0.1 unless `host` says otherwise).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        host: interface to bind ("0.0.0.0" exposes it to the network: there is no authentication).
        port: TCP port.
        share: also publish it through a temporary public gradio.live link.
        system_prompt: the system message of every conversation.
        max_window_size: prompt budget in tokens.
        decoder: the model's CUDA-graph decoder, or None.
        **launch_kwargs: further `gr.Blocks.launch` arguments (e.g. `auth`).
    """
    launch_kwargs.setdefault("max_file_size", "20mb")
    app = build_app(model, tokenizer, system_prompt=system_prompt, max_window_size=max_window_size, decoder=decoder)
    app.queue().launch(server_name=host, server_port=port, share=share, **launch_kwargs)
