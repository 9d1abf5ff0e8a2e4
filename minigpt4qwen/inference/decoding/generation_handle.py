"""What `GenerationScheduler.submit` returns: one request's tokens as they come, its text, its end.

    handle = scheduler.submit(input_ids, pixel_values=pixels, settings=settings)
    for piece in handle:            # or `async for`; leaving the loop early cancels the request
        print(piece, end="")
    handle.result()                 # the whole reply (what ChatSession.ask returns), or raises its error

The text pieces concatenate to `result()`: the reply decoded with special tokens dropped, cut before the first
stop string, stripped (`StopTrimmer` holds back what a later token may still cut).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.engine import GenerationCancelled
from minigpt4qwen.inference.generation import GenerationSettings, StopTrimmer, decode_reply


class _Pieces:
    """Turns a growing token list into new text pieces, decoded incrementally as vLLM and TGI do.

    Each call decodes the tokens from the start of the last piece handed out, without and with the tokens not yet
    handed out, and hands out the difference; the shared first token keeps tokenizers that drop a leading space
    at the start of a decode (SentencePiece) from changing the text at the boundary. A piece ending in U+FFFD (an
    incomplete character, most often) waits for the next tokens, up to `HOLD_TOKENS` of them. The last piece is
    the rest of the whole reply's decoded text, so for byte-level tokenizers (Qwen, Llama 3) the pieces
    concatenate to it exactly; a tokenizer whose decode rewrites earlier text (byte fallback, clean-up of
    spaces) keeps streaming, and only then may the pieces differ from the whole decode where it was rewritten.
    While pieces come out, a reply of n tokens costs O(n) decoding (decoding it whole each time: O(n^2))."""

    HOLD_TOKENS = 16  # a character spans at most 4 byte tokens; more held tokens mean a U+FFFD in the text itself

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer, self.trimmer = tokenizer, StopTrimmer(stop)
        self.start = 0  # where the tokens of the last piece handed out begin
        self.end = 0  # tokens handed out so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, ids: list[int], final: bool) -> str:
        if final:  # the rest of the whole reply's text (a stopped trimmer ignores it)
            whole, fed = self._decode(ids), self.trimmer.text
            common = len(fed) if whole.startswith(fed) else len(os.path.commonprefix([whole, fed]))
            return self.trimmer.feed(whole[common:], final=True)
        before, after = self._decode(ids[self.start:self.end]), self._decode(ids[self.start:])
        settled = not after.endswith("\ufffd") or len(ids) - self.end > self.HOLD_TOKENS
        piece = ""
        if len(after) > len(before) and settled:
            piece, self.start, self.end = after[len(before):], self.end, len(ids)
        return self.trimmer.feed(piece)


class GenerationHandle:
    """One request of a `GenerationScheduler`. Thread-safe; iterate it once (sync or async); `result()` any time.

    Attributes:
        prompt_tokens: the prompt's length in tokens.
        token_ids: the tokens generated so far (stop token included).
        finish_reason: None while running; "stop" (a stop token or string), "length" (max_new_tokens or the
            slot's capacity ran out), "cancelled" or "error".
        error: what failed the request, if anything.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, prompt_tokens: int,
                 on_cancel: Callable[[], None]):
        self.tokenizer, self.settings, self.prompt_tokens = tokenizer, settings, prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._wakers: set[Callable[[], None]] = set()

    # ------------------------------------------------------------------------- scheduler side
    def push(self, ids: list[int]) -> None:
        """Appends generated tokens (scheduler thread)."""
        with self._cond:
            self.token_ids.extend(ids)
        self._notify()

    def end(self, reason: str, error: BaseException | None = None) -> None:
        """Marks the request finished (scheduler thread); later calls change nothing."""
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
        self._notify()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls `callback()` after every later change (new tokens, the end), from the scheduler's thread: keep it
        short. Changes made before it was added are not signalled: read `snapshot` once after adding it."""
        with self._cond:
            self._wakers.add(callback)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # -------------------------------------------------------------------------- caller side
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def cancel(self) -> None:
        """Stops the request at the next step boundary (its slot is freed then); a no-op once it is done."""
        if not self.done and not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the request is done; returns whether it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def result(self, timeout: float | None = None) -> str:
        """The reply text, once done.

        Raises:
            TimeoutError: not done within `timeout` seconds.
            GenerationCancelled: it was cancelled (`partial` holds the reply so far).
            Exception: whatever failed it (a bad prompt, an error in its prefill, ...).
        """
        if not self.wait(timeout):
            raise TimeoutError(f"the request is still running after {timeout} s")
        if self.error is not None:
            raise self.error
        text = decode_reply(self.tokenizer, self.token_ids, self.settings.stop)
        if self.finish_reason == "cancelled":
            raise GenerationCancelled(text)
        return text

    def snapshot(self, since: int = 0) -> tuple[list[int], bool]:
        """The tokens generated so far (from index `since` on) and whether the request is done, read together."""
        with self._cond:
            return self.token_ids[since:], self.done

    def _next(self, last: list[int] | None) -> tuple[list[int], bool]:
        """The tokens and done flag once they differ from `last` (at once when `last` is None)."""
        with self._cond:
            self._cond.wait_for(lambda: last is None or self.done or len(self.token_ids) != len(last))
            return list(self.token_ids), self.done

    def __iter__(self) -> Iterator[str]:
        """The reply as text pieces; ends quietly when cancelled, raises the request's error."""
        pieces, ids = _Pieces(self.tokenizer, self.settings.stop), None
        try:
            while True:
                ids, done = self._next(ids)
                if piece := pieces.feed(ids, final=done):
                    yield piece
                if done:
                    break
        finally:
            self.cancel()  # the consumer left early (a no-op once done)
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[str]:
        """As `__iter__`, without blocking the event loop."""
        loop, changed = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        pieces, seen = _Pieces(self.tokenizer, self.settings.stop), -1
        with self._cond:
            self._wakers.add(wake)
        try:
            while True:
                changed.clear()
                ids, done = self.snapshot()
                if len(ids) != seen or done:
                    seen = len(ids)
                    if piece := pieces.feed(ids, final=done):
                        yield piece
                    if done:
                        break
                else:
                    await changed.wait()
        finally:
            with self._cond:
                self._wakers.discard(wake)
            self.cancel()
        if self.error is not None:
            raise self.error
