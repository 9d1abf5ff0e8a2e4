"""A gradio web UI over `ChatSession`: upload images, chat with streamed replies, tune decoding, regenerate.

    launch(model, tokenizer, port=7860)   # then open http://127.0.0.1:7860

Each browser tab has its own session (images are encoded once, on upload; see `ChatTab`); the replies of every tab
are decoded together by the model's `GenerationScheduler` (continuous batching). A reply stops when its tab goes
away, or at once on Stop, Clear history or Restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any

import gradio as gr
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.chat_tab import Chat, ChatTab
from minigpt4qwen.inference.prompt_budget import over_budget
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

TITLE = "MiniGPT4Qwen"
INTRO = ("Upload one or several images (or none), ask, and the answer streams in. Images uploaded after a question "
         "belong to the next one. **Stop** ends the reply being written: a stopped reply is not part of the "
         "conversation, and **Regenerate** answers its question again. **Restart** forgets everything; "
         "**Clear history** keeps the images.")
_DEFAULTS = GenerationSettings()


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


def build_app(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, scheduler: GenerationScheduler, *,
              system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_window_size: int = 6144) -> gr.Blocks:
    """Builds the web UI for `model`.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        scheduler: the model's generation scheduler (owned by the caller): every tab's replies go through it.
        system_prompt: the system message of every conversation.
        max_window_size: prompt budget in tokens (at most a slot's capacity less one); older turns are dropped
            beyond it.

    Returns:
        The gradio app (call `.launch()`, or use `launch`).
    """
    window = min(max_window_size, scheduler.capacity - 1)
    budget_option = "--max-window-size" if window == max_window_size else "--slot-tokens"

    def new_tab() -> ChatTab:
        return ChatTab(ChatSession(model, tokenizer, system_prompt=system_prompt, max_window_size=window), scheduler)

    def upload(files: list[str] | None, tab: ChatTab | None) -> tuple[None, Chat, ChatTab]:
        tab = tab or new_tab()
        for path in files or []:
            tab.add_image(path)
        return None, list(tab.chat), tab

    def checked(controls: tuple) -> GenerationSettings | None:
        try:
            return _settings(*controls)
        except ValueError as err:
            gr.Warning(str(err))
            return None

    def outputs(tab: ChatTab, chats: Generator[Chat, None, None],
                box: Any = None) -> Iterator[tuple[Any, Chat, ChatTab]]:
        """(question box, chat, tab) for each chat, the box set to `box` with the first if given; at least one
        (gradio empties the outputs of an event that yields none)."""
        shown = False
        with contextlib.closing(chats):  # closed with this generator: the tab's reply stops when gradio drops it
            for chat in chats:
                yield (box if box is not None and not shown else gr.update()), chat, tab
                shown = True
        if not shown:
            yield gr.update(), gr.update(), tab

    def ask(text: str, tab: ChatTab | None, *controls: Any) -> Iterator[tuple[Any, Chat, ChatTab | None]]:
        settings = checked(controls)
        if not text.strip() or settings is None:
            if settings is not None:
                gr.Warning("Type a question first.")
            yield gr.update(), gr.update(), tab
            return
        tab = tab or new_tab()
        if problem := over_budget(tab.session, text, budget_option):  # the question stays in the box, to be shortened
            gr.Warning(problem)
            yield gr.update(), gr.update(), tab
            return
        yield from outputs(tab, tab.ask(text, settings), box="")

    def regenerate(tab: ChatTab | None, *controls: Any) -> Iterator[tuple[Any, Chat, ChatTab | None]]:
        settings = checked(controls)
        if tab is None or settings is None:
            if settings is not None:
                gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield gr.update(), gr.update(), tab
            return
        yield from outputs(tab, tab.regenerate(settings))

    def stop_reply(tab: ChatTab | None) -> None:
        if tab is not None:
            tab.stop()

    def clear_history(tab: ChatTab | None) -> tuple[Chat, ChatTab | None]:
        return ([], None) if tab is None else (tab.clear_history(), tab)

    def start_over(tab: ChatTab | None) -> tuple[None, ChatTab, str]:
        """Restart: the images, the tab's session and the question box emptied (a new session at once)."""
        if tab is not None:
            tab.chat = []
            tab.drop_reply()
        return None, new_tab(), ""

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        # A session per browser tab from the moment the page loads (gradio calls `new_tab` per visitor): the
        # first events of a tab, an upload and a question sent at once, then share it instead of each making one.
        tab_state = gr.State(new_tab)
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
        images.upload(upload, [images, tab_state], [images, chatbot, tab_state])
        # One queue for the replies of every tab, as wide as the scheduler: more wait, shown their place in line.
        reply_queue = {"concurrency_id": "replies", "concurrency_limit": scheduler.slots}
        replies = [trigger(ask, [query, tab_state, *controls], [query, chatbot, tab_state], **reply_queue)
                   for trigger in (query.submit, send.click)]
        replies.append(again.click(regenerate, [tab_state, *controls], [query, chatbot, tab_state], **reply_queue))
        # Not queued: it acts at once, however busy the queues are. The reply then ends by itself.
        stop.click(stop_reply, [tab_state], None, queue=False)
        # These stop the tab's reply themselves, at once; `cancels` also drops the tab's requests still queued.
        clear.click(clear_history, [tab_state], [chatbot, tab_state], cancels=replies)
        restart.click(lambda tab: ([], *start_over(tab)), [tab_state], [chatbot, images, tab_state, query],
                      cancels=replies)
        chatbot.clear(start_over, [tab_state], [images, tab_state, query], cancels=replies)  # its bin icon
    return app


def launch(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, scheduler: GenerationScheduler | None = None, *,
           host: str = "127.0.0.1", port: int = 7860, share: bool = False, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
           max_window_size: int = 6144, **launch_kwargs: Any) -> None:
    """Serves the web UI until interrupted (binds 127.0.0.1 unless `host` says otherwise).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        scheduler: the model's generation scheduler (the caller's); None: one with the scheduler's default slots,
            closed on return.
        host: interface to bind ("0.0.0.0" exposes it to the network: there is no authentication).
        port: TCP port.
        share: also publish it through a temporary public gradio.live link.
        system_prompt: the system message of every conversation.
        max_window_size: prompt budget in tokens.
        **launch_kwargs: further `gr.Blocks.launch` arguments (e.g. `auth`).
    """
    launch_kwargs.setdefault("max_file_size", "20mb")
    own = scheduler is None
    scheduler = scheduler or GenerationScheduler(model, tokenizer)
    try:
        app = build_app(model, tokenizer, scheduler, system_prompt=system_prompt, max_window_size=max_window_size)
        # Quiet: gradio's startup lines tell a Python user to set `share=True`; this is the CLI's, and names its flag.
        app.queue().launch(server_name=host, server_port=port, share=share, quiet=True, prevent_thread_lock=True,
                           **launch_kwargs)
        print(f"* Running on local URL:  {app.local_url}", flush=True)
        if not share:
            print("* To create a public link, restart with --share (minigpt4qwen webui --share ...)", flush=True)
        app.block_thread()
    finally:
        if own:
            scheduler.close()
