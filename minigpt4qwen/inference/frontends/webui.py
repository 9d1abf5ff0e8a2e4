"""A gradio web UI over `ChatSession`: upload images, chat with streamed replies, tune decoding, regenerate.

    launch(model, tokenizer, port=7860)   # then open http://127.0.0.1:7860

Each browser tab has its own session (images are encoded once, on upload); generations on the one model run one
at a time, and a reply stops when its tab goes away, or at once on Stop, Clear history or Restart.
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
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.streaming import Action, ReplyStream
from minigpt4qwen.inference.prompt_budget import over_budget
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

TITLE = "MiniGPT4Qwen"
INTRO = ("Upload one or several images (or none), ask, and the answer streams in. Images uploaded after a question "
         "belong to the next one. **Stop** ends the reply being written: a stopped reply is not part of the "
         "conversation, and **Regenerate** answers its question again. **Restart** forgets everything; "
         "**Clear history** keeps the images.")
STOPPED = "(stopped)"  # appended to a reply that Stop cut short
_DEFAULTS = GenerationSettings()
_DROP_WAIT_S = 10.0  # how long Clear/Restart wait for a stopped stream; it takes a decoding step unless stuck
Chat = list[dict[str, Any]]  # the chatbot's messages


@dataclass
class _Tab:
    """What one browser tab holds: its session and the messages on its screen."""

    session: ChatSession
    chat: list[dict[str, Any]] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    reply: ReplyStream | None = None  # the reply being written
    streamed: threading.Event = field(default_factory=threading.Event)  # set when its last update has gone out
    redo: Action | None = None  # what Regenerate runs: a request that was stopped or failed (None: the last answer)

    def stop(self) -> None:
        """Stops the reply being written, if any (it ends on screen marked as stopped)."""
        if self.reply is not None:
            self.reply.cancel()

    def drop_reply(self) -> None:
        """Stops the reply being written, whose stream then ends showing `chat` as it is now (set it first).

        Returns once that stream has ended (a decoding step after the stop), so that no update of the reply
        reaches the browser after the caller's.
        """
        reply, self.reply, self.redo = self.reply, None, None
        if reply is not None:
            reply.cancel()
            self.streamed.wait(timeout=_DROP_WAIT_S)


def _settings(do_sample: bool, num_beams: float, temperature: float, top_k: float, top_p: float,
              repetition_penalty: float, max_new_tokens: float, seed: str) -> GenerationSettings:
    """The controls' values (sliders give floats; the seed is text, empty for none) as checked settings.

    Raises:
        ValueError: a seed that is not a whole number, or a value out of range.
    """
    if seed.strip() and not seed.strip().isdigit():
        raise ValueError(f"seed must be a whole number >= 0 (or empty), got {seed.strip()!r}")
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
        top_p=float(top_p), top_k=int(top_k), num_beams=int(num_beams), repetition_penalty=float(repetition_penalty),
        seed=int(seed) if seed.strip() else None,
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

    def stream(tab: _Tab, slot: dict[str, Any], action: Action, settings: GenerationSettings) -> Iterator[Chat]:
        """Streams a reply into `slot`, an assistant message of `tab.chat`, yielding the chat after each piece.

        Until the reply is complete, Regenerate runs `action` again. Stop (`tab.stop`) ends it marked as stopped.
        Clear history and Restart (`tab.drop_reply`) replace `tab.chat` and end it: its last update is then their
        screen, because gradio sends an event's last value again when it ends, after anything its caller shows.
        """
        answered = threading.Event()

        def run(session: ChatSession, options: GenerationSettings, streamer: Any) -> str:
            text = action(session, options, streamer)  # raises GenerationCancelled if stopped
            answered.set()
            return text

        reply = tab.reply = ReplyStream(lambda: tab.session, run, settings, lock=lock)
        streamed = tab.streamed = threading.Event()
        tab.redo, text, failed = action, "", False
        try:
            try:
                for piece in reply:
                    if tab.reply is not reply:
                        break
                    text += piece
                    slot["content"] = text
                    yield list(tab.chat)
            except (ValueError, RuntimeError) as err:
                gr.Warning(f"generation failed: {err}")
                failed = True
            if tab.reply is reply:
                if answered.is_set():
                    tab.redo = None
                stopped = not answered.is_set() and not failed
                slot["content"] = f"{text} {STOPPED}".lstrip() if stopped else (text or "(no answer)")
            yield list(tab.chat)
        finally:  # also when gradio closes the generator (the tab went away, or Clear/Restart cancelled it)
            if tab.reply is reply:
                tab.reply = None
            streamed.set()

    def ask(text: str, tab: _Tab | None, *controls: Any) -> Iterator[tuple[Any, Chat, _Tab | None]]:
        settings = checked(controls)
        if not text.strip() or settings is None:
            if settings is not None:
                gr.Warning("Type a question first.")
            yield gr.update(), gr.update(), tab
            return
        tab = tab or new_tab()
        if problem := over_budget(tab.session, text):  # the question stays in the box, to be shortened
            gr.Warning(problem)
            yield gr.update(), gr.update(), tab
            return
        slot = {"role": "assistant", "content": ""}
        tab.chat += [{"role": "user", "content": text}, slot]
        yield "", list(tab.chat), tab
        for chat in stream(tab, slot, lambda session, options, streamer: session.ask(text, options, streamer),
                           settings):
            yield gr.update(), chat, tab

    def regenerate(tab: _Tab | None, *controls: Any) -> Iterator[tuple[Any, Chat, _Tab | None]]:
        settings = checked(controls)
        if tab is None or (tab.redo is None and not tab.session.turns) or settings is None:
            if settings is not None:
                gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield gr.update(), gr.update(), tab
            return
        # The new reply takes the last one's place; images uploaded since stay below it, pending for the next question.
        last = max(i for i, message in enumerate(tab.chat) if message["role"] == "assistant")
        slot = tab.chat[last] = {"role": "assistant", "content": ""}
        yield gr.update(), list(tab.chat), tab
        action = tab.redo or (lambda session, options, streamer: session.regenerate(options, streamer))
        for chat in stream(tab, slot, action, settings):
            yield gr.update(), chat, tab

    def stop_reply(tab: _Tab | None) -> None:
        if tab is not None:
            tab.stop()

    def clear_history(tab: _Tab | None) -> tuple[Chat, _Tab | None]:
        if tab is None:
            return [], None
        tab.chat = [{"role": "user", "content": {"path": path}} for path in tab.image_paths]
        tab.drop_reply()
        tab.session.clear_history()  # waits for a stopped reply to let go of the session: one decoding step
        return list(tab.chat), tab

    def start_over(tab: _Tab | None) -> tuple[None, None, str]:
        """Restart: the images, the tab's session and the question box emptied."""
        if tab is not None:
            tab.chat = []
            tab.drop_reply()
        return None, None, ""

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
                repetition_penalty = gr.Slider(0.5, 2.0, _DEFAULTS.repetition_penalty, step=0.05,
                                               label="repetition_penalty (1: off; above 1 discourages repeats)",
                                               elem_id="repetition-penalty")
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
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear history", elem_id="clear-history")
                    restart = gr.Button("Restart", elem_id="restart")
        controls = [do_sample, num_beams, temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed]
        # One queue for everything that runs the model, so the UI shows waiting users their place in line.
        model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
        images.upload(upload, [images, tab_state], [images, chatbot, tab_state], **model_queue)
        replies = [trigger(ask, [query, tab_state, *controls], [query, chatbot, tab_state], **model_queue)
                   for trigger in (query.submit, send.click)]
        replies.append(again.click(regenerate, [tab_state, *controls], [query, chatbot, tab_state], **model_queue))
        # Not queued: it must act while the reply it stops holds the model queue. The reply then ends by itself.
        stop.click(stop_reply, [tab_state], None, queue=False)
        # These stop the tab's reply themselves, at once; `cancels` also drops the tab's requests still queued.
        clear.click(clear_history, [tab_state], [chatbot, tab_state], cancels=replies)
        restart.click(lambda tab: ([], *start_over(tab)), [tab_state], [chatbot, images, tab_state, query],
                      cancels=replies)
        chatbot.clear(start_over, [tab_state], [images, tab_state, query], cancels=replies)  # its bin icon
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
    # Quiet: gradio's own startup lines tell a Python user to set `share=True`; this is the CLI's, and names its flag.
    app.queue().launch(server_name=host, server_port=port, share=share, quiet=True, prevent_thread_lock=True,
                       **launch_kwargs)
    print(f"* Running on local URL:  {app.local_url}", flush=True)
    if not share:
        print("* To create a public link, restart with --share (minigpt4qwen webui --share ...)", flush=True)
    app.block_thread()
