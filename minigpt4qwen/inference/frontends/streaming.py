"""Streaming one reply of a `ChatSession` to the web UI and the HTTP server.

`ReplyStream` runs the generation in a worker thread, one at a time per lock, and yields text pieces (`for` or
`async for`); a consumer that leaves early (closed tab, dropped HTTP client) cancels it. The pieces concatenate to
the reply `ChatSession.ask` returns (cut at the first stop string, stripped); OpenAI's finish reason comes along.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from transformers import TextStreamer

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.inference.engine import ChatSession, GenerationCancelled, GenerationSettings
from minigpt4qwen.inference.generation import StopTrimmer

# (session, settings, streamer) -> reply, e.g. `lambda s, g, st: s.ask(query, g, st)`.
Action = Callable[[ChatSession, GenerationSettings, Any], str]


class _PieceStreamer(TextStreamer):
    """Hands decoded text to `sink`, counts the generated tokens and remembers the last one."""

    def __init__(self, session: ChatSession, sink: Callable[[str], None], cancelled: threading.Event):
        super().__init__(session.tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.session, self.sink, self.cancelled = session, sink, cancelled
        self.num_tokens, self.last_token = 0, None

    def put(self, value: Any) -> None:
        if self.cancelled.is_set():  # the engine clears its flag when generation starts: raise it again
            self.session.cancel()
        ids = value.reshape(-1).tolist()
        self.num_tokens += len(ids)
        self.last_token = ids[-1] if ids else self.last_token
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.sink(text)


class ReplyStream:
    """One reply, generated in a worker thread and iterated once as text pieces (`for` or `async for`).

    Args:
        make_session: returns the session to use; runs in the worker under `lock` (so it may encode images).
        action: generates with it, e.g. `lambda s, g, st: s.ask(query, g, st)`.
        settings: decoding options (their stop strings also cut the streamed text).
        lock: serialises generations on one model.

    Raises:
        Exception: whatever `make_session` or `action` raised, re-raised by the iteration.
    """

    def __init__(self, make_session: Callable[[], ChatSession], action: Action, settings: GenerationSettings, *,
                 lock: threading.Lock):
        self.make_session, self.action, self.settings, self.lock = make_session, action, settings, lock
        self.cancelled = threading.Event()
        self.trimmer = StopTrimmer(settings.stop)
        self.streamer: _PieceStreamer | None = None
        self.session: ChatSession | None = None
        self.error: BaseException | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens generated (0 before the generation starts)."""
        return self.streamer.num_tokens if self.streamer else 0

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "length" when max_new_tokens ran out before a stop token or string, else "stop"."""
        if self.streamer is None or self.trimmer.stopped or self.num_tokens < self.settings.max_new_tokens:
            return "stop"
        return "stop" if self.streamer.last_token in chat_stop_token_ids(self.streamer.tokenizer) else "length"

    def cancel(self) -> None:
        """Stops the generation at its next token (or before it starts); a no-op once it has finished."""
        self.cancelled.set()
        if self.session is not None:
            self.session.cancel()

    def _work(self, put: Callable[[str | None], None]) -> None:
        try:
            with self.lock:
                if self.cancelled.is_set():
                    return
                self.session = self.make_session()
                self.streamer = _PieceStreamer(self.session, put, self.cancelled)
                self.action(self.session, self.settings, self.streamer)
        except GenerationCancelled:
            pass  # only we cancel, and only once the consumer has gone
        except Exception as err:  # handed to the consuming thread, which re-raises it
            self.error = err
        finally:
            put(None)

    def _start(self, put: Callable[[str | None], None]) -> threading.Thread:
        worker = threading.Thread(target=self._work, args=(put,), daemon=True, name="minigpt4qwen-generate")
        worker.start()
        return worker

    def _finish(self, worker: threading.Thread) -> str:
        worker.join()
        if self.error is not None:
            raise self.error
        return self.trimmer.feed("", final=True)

    def __iter__(self) -> Iterator[str]:
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        worker = self._start(pieces.put)
        try:
            while (piece := pieces.get()) is not None:
                if out := self.trimmer.feed(piece):
                    yield out
            if tail := self._finish(worker):
                yield tail
        finally:
            self.cancel()  # the consumer left early (or all is done): free the model

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        worker = self._start(lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        try:
            while (piece := await pieces.get()) is not None:
                if out := self.trimmer.feed(piece):
                    yield out
            if tail := await asyncio.to_thread(self._finish, worker):
                yield tail
        finally:
            self.cancel()
