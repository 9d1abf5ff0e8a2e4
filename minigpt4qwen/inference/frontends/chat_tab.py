"""One browser tab of the web UI: its `ChatSession`, the messages on its screen, and the reply being written.

    tab = ChatTab(ChatSession(model, tokenizer), scheduler)
    tab.add_image("cat.jpg")
    for chat in tab.ask("What is in the picture?", GenerationSettings()):
        show(chat)                  # the chatbot's messages after each piece of the reply

Replies go through the model's `GenerationScheduler`, so the replies of every tab are decoded together; beam search
(which the scheduler does not batch) and, on a GPU, image encoding hold the model between its steps (`model_lock`).
A tab writes one reply at a time: a question sent meanwhile waits for the reply before it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from minigpt4qwen.data.images import ImageLoadError
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.streaming import ReplyStream

STOPPED = "(stopped)"  # appended to a reply that Stop cut short
# Appended to a reply that ran out of room in its scheduler slot before max_new_tokens.
SLOT_FULL = "(cut short: the conversation filled its slot; clear the history, or start with a larger --slot-tokens)"
_DROP_WAIT_S = 10.0  # how long Clear/Restart wait for a stopped stream; it takes a decoding step unless stuck
Chat = list[dict[str, Any]]  # the chatbot's messages


class _Reply:
    """One reply: a new question (`text`) or the last one again (None). Iterate it once for its text pieces;
    `cancel()` from any thread; `answered` once it is complete and in the session's history."""

    def __init__(self, session: ChatSession, scheduler: GenerationScheduler, text: str | None,
                 settings: GenerationSettings):
        self.session, self.scheduler, self.text, self.settings = session, scheduler, text, settings
        self.answered = self._cancelled = False
        self._cancel: Callable[[], None] | None = None  # the running request's, once it is submitted

    def cancel(self) -> None:
        self._cancelled = True
        if self._cancel is not None:
            self._cancel()

    def _started(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        if self._cancelled:  # cancelled while it was being submitted
            cancel()

    def __iter__(self) -> Iterator[str]:
        yield from self._beam_search() if self.settings.num_beams > 1 else self._batched()

    def _batched(self) -> Iterator[str]:
        session, capacity = self.session, self.scheduler.capacity
        # The prompt and its reply share one slot: older turns go so that the reply keeps its max_new_tokens, or
        # half the slot when it asks for more (the prompt keeps the other half).
        window = capacity - min(self.settings.max_new_tokens, capacity // 2)
        if self.text is None:
            query, images, ids, features = session.regenerate_prompt(window)
        else:
            with session.lock:  # the images the prompt holds are the ones its turn records
                query, images = session.with_image_markers(self.text), list(session.pending_images)
                ids, features = session.build_prompt(query, window)
        handle = self.scheduler.submit(ids, image_features=features, settings=self.settings)
        self._started(handle.cancel)
        yield from handle  # a consumer that leaves early cancels it
        if handle.finish_reason != "cancelled":
            session.record_turn(query, handle.result(), images, replace_last=self.text is None)
            self.answered = True
            if handle.finish_reason == "length" and handle.num_tokens < self.settings.max_new_tokens:
                yield f" {SLOT_FULL}"  # on screen only, not in the history

    def _beam_search(self) -> Iterator[str]:
        def run(session: ChatSession, settings: GenerationSettings, streamer: Any) -> str:
            reply = session.regenerate(settings, streamer) if self.text is None else session.ask(
                self.text, settings, streamer)  # records the turn; raises GenerationCancelled if stopped
            self.answered = True
            return reply

        reply = ReplyStream(lambda: self.session, run, self.settings, lock=self.scheduler.model_lock)
        self._started(reply.cancel)
        yield from reply


class ChatTab:
    """What one browser tab holds: its session, the messages on its screen, the reply being written.

    Args:
        session: the tab's conversation.
        scheduler: the model's generation scheduler (shared by every tab).
    """

    def __init__(self, session: ChatSession, scheduler: GenerationScheduler):
        self.session, self.scheduler = session, scheduler
        self.chat: Chat = []
        self.image_paths: list[str] = []
        self.reply: _Reply | None = None  # the reply being written
        self.streamed = threading.Event()  # set when the reply's stream has ended
        self.redo: str | None = None  # what Regenerate asks again: a question stopped or failed (None: the last one)
        self._one_reply = threading.Lock()
        self._drops = 0  # Clear history and Restart: a question waiting for the reply before it is dropped

    def _model_turn(self) -> contextlib.AbstractContextManager:
        # On a GPU, other work on it during the scheduler's CUDA-graph captures would break them: wait for a step.
        return self.scheduler.model_lock if self.session.device.type == "cuda" else contextlib.nullcontext()

    def add_image(self, path: str) -> None:
        """Encodes the image at `path` for the next question and shows it; warns (gr.Warning) if it cannot be read."""
        try:
            with self._model_turn():
                self.session.add_image(path)
        except ImageLoadError as err:
            gr.Warning(f"{Path(path).name} was not added: {err.kind.replace('_', ' ')}")
            return
        self.image_paths.append(path)
        self.chat.append({"role": "user", "content": {"path": path}})

    def ask(self, text: str, settings: GenerationSettings) -> Generator[Chat, None, None]:
        """Shows `text` and streams its answer; yields the chat each time it changes (nothing if Clear history or
        Restart came while it waited for the tab's reply before it)."""
        drops = self._drops
        with self._one_reply:
            if self._drops != drops:
                return
            slot = {"role": "assistant", "content": ""}
            self.chat += [{"role": "user", "content": text}, slot]
            yield list(self.chat)
            yield from self._stream(slot, text, settings)

    def regenerate(self, settings: GenerationSettings) -> Generator[Chat, None, None]:
        """Answers again the question stopped or failed last, else the last one (replacing its answer; images added
        since stay pending, below it). Yields as `ask`; warns (gr.Warning) when there is nothing to answer again."""
        drops = self._drops
        with self._one_reply:
            if self._drops != drops:
                return
            if self.redo is None and not self.session.turns:
                gr.Warning("Nothing to regenerate yet: ask a question first.")
                return
            last = max(i for i, message in enumerate(self.chat) if message["role"] == "assistant")
            slot = self.chat[last] = {"role": "assistant", "content": ""}
            yield list(self.chat)
            yield from self._stream(slot, self.redo, settings)

    def _stream(self, slot: dict[str, Any], text: str | None, settings: GenerationSettings) -> Iterator[Chat]:
        """Streams a reply into `slot`, an assistant message of `chat`, yielding the chat after each piece.

        Until the reply is complete, Regenerate asks `text` again. Stop ends it marked as stopped. Clear history
        and Restart (`drop_reply`) replace `chat` and end it: its last update is then their screen, because gradio
        sends an event's last value again when it ends, after anything its caller shows.
        """
        reply = self.reply = _Reply(self.session, self.scheduler, text, settings)
        streamed = self.streamed = threading.Event()
        self.redo, answer, failed = text, "", False
        try:
            try:
                for piece in reply:
                    if self.reply is not reply:
                        break
                    answer += piece
                    slot["content"] = answer
                    yield list(self.chat)
            except (ValueError, RuntimeError) as err:
                gr.Warning(f"generation failed: {err}")
                failed = True
            if self.reply is reply:
                if reply.answered:
                    self.redo = None
                stopped = not reply.answered and not failed
                slot["content"] = f"{answer} {STOPPED}".lstrip() if stopped else (answer or "(no answer)")
            yield list(self.chat)
        finally:  # also when gradio closes the generator (the tab went away, or Clear/Restart cancelled it)
            reply.cancel()  # a no-op once it is done
            if self.reply is reply:
                self.reply = None
            streamed.set()

    def stop(self) -> None:
        """Stops the reply being written, if any (it ends on screen marked as stopped)."""
        if self.reply is not None:
            self.reply.cancel()

    def drop_reply(self) -> None:
        """Stops the reply being written, whose stream then ends showing `chat` as it is now (set it first), and
        drops questions waiting for it.

        Returns once that stream has ended (a decoding step after the stop), so that no update of the reply
        reaches the browser after the caller's, and its session is left alone.
        """
        self._drops += 1
        reply, self.reply, self.redo = self.reply, None, None
        if reply is not None:
            reply.cancel()
            self.streamed.wait(timeout=_DROP_WAIT_S)

    def clear_history(self) -> Chat:
        """Forgets the conversation, keeping its images for the next question; returns the chat left (the images)."""
        self.chat = [{"role": "user", "content": {"path": path}} for path in self.image_paths]
        self.drop_reply()
        self.session.clear_history()
        return list(self.chat)
