"""A beam-search reply streamed as text from the model's process (`engine_link`): what `ReplyStream` offers the
HTTP app (async text pieces, `num_tokens`, `finish_reason`, `cancel`), fed by the link's receiving thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable


class RemoteText:
    """A reply whose pieces, end and counts arrive from another thread (`push`, `finish`).

    Args:
        cancel: asks the model's process to stop it.
    """

    def __init__(self, cancel: Callable[[], None]):
        self._cancel, self._lock = cancel, threading.Lock()
        self.pieces: list[str] = []
        self.done, self.error = False, None
        self.num_tokens, self.prompt_tokens, self.finish_reason = 0, 0, "stop"
        self._wakers: set[Callable[[], None]] = set()

    def push(self, pieces: list[str]) -> None:
        """Appends text pieces (the link's receiving thread)."""
        with self._lock:
            self.pieces += pieces
        self._notify()

    def finish(self, reason: str, error: str | None, num_tokens: int, prompt_tokens: int) -> None:
        """Marks the reply ended, with the engine's finish reason, error message and token counts."""
        with self._lock:
            self.done, self.finish_reason = True, reason
            self.error = None if error is None else RuntimeError(error)
            self.num_tokens, self.prompt_tokens = num_tokens, prompt_tokens
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def cancel(self) -> None:
        """Asks the engine to stop the beam search (a no-op once ended)."""
        if not self.done:
            self._cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        """The reply's text pieces as they come; leaving early cancels it; raises the engine's error."""
        loop, changed, seen = asyncio.get_running_loop(), asyncio.Event(), 0

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        with self._lock:
            self._wakers.add(wake)
        try:
            while True:
                changed.clear()
                with self._lock:
                    pieces, done = self.pieces[seen:], self.done
                seen += len(pieces)
                for piece in pieces:
                    yield piece
                if done:
                    break
                if not pieces:
                    await changed.wait()
        finally:
            with self._lock:
                self._wakers.discard(wake)
            self.cancel()
        if self.error is not None:
            raise self.error
