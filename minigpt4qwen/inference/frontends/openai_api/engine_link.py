"""The link between an HTTP front-end process and the process that holds the model (`serve --frontend-processes`).

In one process, the HTTP server's event loop and worker threads (parsing, image decoding, tokenizing, detokenizing,
streaming) share the interpreter's lock with the scheduler's thread, which then waits for it between the GPU's
chunks. Across two processes they do not: the front end builds prompts and turns tokens into text; the model's
process only schedules and decodes.

Over one `multiprocessing` connection:
- front end -> engine: ("submit", id, prompt ids, pixels, settings), ("beam", id, conversation, settings, window),
  ("cancel", id); arrays travel as numpy (plain pickles, no shared-memory file descriptors);
- engine -> front end: ("update", [(id, new tokens or text pieces, end or None), ...]) with every request's news
  since the last message, and ("stats", scheduler stats) every `stats_every` seconds. An end is (finish reason,
  error message or None, tokens generated, prompt tokens).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.decoding.scheduler import SchedulerUnavailable, check_request
from minigpt4qwen.inference.engine import GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.local_backend import LocalBackend
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import Conversation, PromptSpec
from minigpt4qwen.inference.frontends.openai_api.remote_text import RemoteText

log = logging.getLogger(__name__)


def hang_up(connection: Any) -> None:
    """Shuts a connection down for both ends: a `recv` blocked on it in another thread ends (EOFError) and the peer
    sees EOF (closing it would do neither)."""
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class EngineBridge:
    """The model's end: runs the front end's requests on a `LocalBackend` and sends their news back.

    Args:
        connection: the front end's connection.
        backend: the model and its scheduler.
        stats_every: seconds between two stats messages.
    """

    def __init__(self, connection: Any, backend: LocalBackend, stats_every: float = 0.5):
        self.connection, self.backend, self.stats_every = connection, backend, stats_every
        self._cond = threading.Condition()
        self._handles: dict[int, tuple[GenerationHandle, list[int]]] = {}  # id -> (handle, [tokens sent])
        self._beams: dict[int, Any] = {}  # id -> beam-search reply
        self._changed: set[int] = set()
        self._texts: list[tuple[int, list[str], tuple | None]] = []  # beam search news
        self._stopped = False

    def run(self) -> None:
        """Serves the front end until it hangs up (or the link breaks); then cancels what it left running and
        closes the connection, so that the front end sees the end too."""
        sender = threading.Thread(target=self._send_news, daemon=True, name="minigpt4qwen-engine-link")
        sender.start()
        try:
            while True:
                kind, rid, *body = self.connection.recv()
                if kind == "submit":
                    self._submit(rid, *body)
                elif kind == "beam":
                    self._start_beam(rid, *body)
                elif kind == "cancel":
                    with self._cond:
                        running = self._beams.get(rid) or self._handles.get(rid, (None,))[0]
                    if running is not None:
                        running.cancel()
        except (EOFError, OSError):
            log.info("the front end hung up")
        except Exception:  # a bug or a message that does not unpickle: end the link rather than hang its requests
            log.exception("the link to a front end broke")
        finally:
            with self._cond:
                self._stopped = True
                handles = [handle for handle, _ in self._handles.values()] + list(self._beams.values())
                self._cond.notify_all()
            for handle in handles:
                handle.cancel()
            sender.join(10)
            self.connection.close()

    def _submit(self, rid: int, ids: np.ndarray, pixels: np.ndarray | None, settings: GenerationSettings) -> None:
        try:
            handle = self.backend.submit(torch.from_numpy(ids), None if pixels is None else torch.from_numpy(pixels),
                                         settings)
        except Exception as err:  # checked by the front end already: a mismatch between the two processes
            self._queue_end(rid, ("error", f"{type(err).__name__}: {err}", 0, len(ids)))
            return
        with self._cond:
            self._handles[rid] = (handle, [0])
        handle.add_listener(lambda: self._mark(rid))
        self._mark(rid)

    def _mark(self, rid: int) -> None:
        with self._cond:
            self._changed.add(rid)
            self._cond.notify_all()

    def _start_beam(self, rid: int, conversation: Conversation, settings: GenerationSettings, window: int) -> None:
        """Registers the beam search (so a cancel that follows finds it), then runs it in a thread of its own."""
        try:
            reply, prompt_tokens = self.backend.beam(conversation, settings, window)
        except Exception as err:
            self._queue_end(rid, ("error", f"{type(err).__name__}: {err}", 0, 0))
            return
        with self._cond:
            self._beams[rid] = reply
        threading.Thread(target=self._beam, args=(rid, reply, prompt_tokens), daemon=True).start()

    def _beam(self, rid: int, reply: Any, prompt_tokens: Callable[[], int]) -> None:
        error = None
        try:
            for piece in reply:
                with self._cond:
                    self._texts.append((rid, [piece], None))
                    self._cond.notify_all()
        except Exception as err:  # the front end's stream reports it
            error = f"{type(err).__name__}: {err}"
        finally:
            with self._cond:
                del self._beams[rid]
            reason = "error" if error else reply.finish_reason
            self._queue_end(rid, (reason, error, reply.num_tokens, prompt_tokens()))

    def _queue_end(self, rid: int, end: tuple) -> None:
        with self._cond:
            self._texts.append((rid, [], end))
            self._cond.notify_all()

    def _news(self) -> list[tuple[int, list, tuple | None]]:
        """Every request's news since the last call (call under `_cond`)."""
        news, self._texts = self._texts, []
        for rid in self._changed:
            if rid not in self._handles:  # its end was sent already
                continue
            handle, sent = self._handles[rid]
            new, done = handle.snapshot(since=sent[0])
            sent[0] += len(new)
            end = None
            if done:
                error = None if handle.error is None else f"{type(handle.error).__name__}: {handle.error}"
                end = (handle.finish_reason, error, sent[0], handle.prompt_tokens)
                del self._handles[rid]
            news.append((rid, new, end))
        self._changed.clear()
        return news

    def _send_news(self) -> None:
        next_stats = 0.0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._changed or self._texts or self._stopped,
                                        max(0.0, next_stats - time.monotonic()))
                    if self._stopped:
                        return
                    news = self._news()
                if news:
                    self.connection.send(("update", news))
                if time.monotonic() >= next_stats:
                    self.connection.send(("stats", self.backend.stats()))
                    next_stats = time.monotonic() + self.stats_every
        except (OSError, ValueError):  # the front end has gone: `run` sees it too
            log.info("the front end's connection closed")
        except Exception:  # a bug: hang up, so that `run` ends and the front end fails what was running
            log.exception("sending to a front end failed")
            hang_up(self.connection)


class RemoteBackend:
    """The front end's end: a backend (see `local_backend`) whose model lives in another process.

    Replies are `GenerationHandle`s fed with the engine's tokens, so text is decoded here, not in the engine.

    Args:
        connection: the engine's connection.
        tokenizer: the model's tokenizer.
        spec: what prompts need of the model.
        capacity: tokens per slot of the engine's scheduler.
        ready_timeout: seconds to wait for the engine's first stats.
    """

    def __init__(self, connection: Any, tokenizer: PreTrainedTokenizerBase, spec: PromptSpec, capacity: int,
                 ready_timeout: float = 60.0):
        self.connection, self.tokenizer, self.spec, self.capacity = connection, tokenizer, spec, capacity
        self.on_lost: Callable[[], None] | None = None  # called once the engine has gone
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._replies: dict[int, GenerationHandle | RemoteText] = {}
        self._ids = itertools.count()
        self._stats: dict[str, Any] | None = None
        self._stats_time = time.monotonic()
        self._ready, self._lost, self._closed = threading.Event(), None, False
        threading.Thread(target=self._receive, daemon=True, name="minigpt4qwen-engine-news").start()
        if not self._ready.wait(ready_timeout):
            raise TimeoutError(f"the engine process did not answer within {ready_timeout:.0f} s")
        if self._lost:
            raise RuntimeError(self._lost)

    def _send(self, message: tuple) -> None:
        if self._lost:
            raise SchedulerUnavailable(self._lost)
        with self._send_lock:
            self.connection.send(message)

    def _register(self, reply: GenerationHandle | RemoteText) -> int:
        rid = next(self._ids)
        with self._lock:
            self._replies[rid] = reply
        return rid

    def _send_registered(self, rid: int, message: tuple) -> None:
        """Sends a request registered as `rid`; one that cannot be sent is forgotten (nothing will answer it)."""
        try:
            self._send(message)
        except BaseException:
            with self._lock:
                self._replies.pop(rid, None)
            raise

    def _cancel(self, rid: int) -> None:
        try:
            self._send(("cancel", rid))
        except (RuntimeError, OSError):
            pass  # the engine has gone: nothing runs

    def submit(self, ids: torch.Tensor, pixels: torch.Tensor | None, settings: GenerationSettings
               ) -> GenerationHandle:
        """Sends a prompt to the engine's scheduler (ValueError for what it would refuse, checked here)."""
        flat, pixels, settings = check_request(ids, pixels, settings, capacity=self.capacity,
                                               image_size=self.spec.image_size)
        rid = -1
        handle = GenerationHandle(self.tokenizer, settings, len(flat), on_cancel=lambda: self._cancel(rid))
        rid = self._register(handle)
        self._send_registered(rid, ("submit", rid, flat.numpy(), None if pixels is None else pixels.numpy(), settings))
        return handle

    def beam(self, conversation: Conversation, settings: GenerationSettings, window: int
             ) -> tuple[RemoteText, Callable[[], int]]:
        """Beam search on the engine's model; returns the streamed reply and its prompt length once known."""
        rid = -1
        reply = RemoteText(cancel=lambda: self._cancel(rid))
        rid = self._register(reply)
        self._send_registered(rid, ("beam", rid, conversation, settings, window))
        return reply, lambda: reply.prompt_tokens

    def stats(self) -> dict[str, Any]:
        """The engine's scheduler stats, as last sent (every `stats_every` s), and their age in seconds."""
        return {**(self._stats or {}), "stats_age_s": round(time.monotonic() - self._stats_time, 3)}

    @property
    def lost(self) -> str | None:
        """Why the engine can no longer be reached (None while it can)."""
        return self._lost

    def close(self) -> None:
        """Closes the link (the app shuts down): what is still running fails."""
        self._closed = True
        self.connection.close()

    def _receive(self) -> None:
        try:
            while True:
                kind, body = self.connection.recv()
                if kind == "stats":
                    self._stats, self._stats_time = body, time.monotonic()
                    self._ready.set()
                    continue
                for rid, new, end in body:
                    with self._lock:
                        reply = self._replies.get(rid) if end is None else self._replies.pop(rid, None)
                    if reply is not None:
                        self._deliver(reply, new, end)
        except (EOFError, OSError, TypeError):  # TypeError: `close` closed the connection under `recv`
            pass
        except Exception:  # a bug: fail what is running rather than leave it hanging
            log.exception("receiving from the engine failed")
        self._lost = ("the server is shutting down" if self._closed
                      else "the engine process has gone; restart the server")
        with self._lock:
            replies, self._replies = list(self._replies.values()), {}
        for reply in replies:
            self._deliver(reply, [], ("error", self._lost, reply.num_tokens, 0))
        self._ready.set()
        if self.on_lost and not self._closed:
            self.on_lost()

    @staticmethod
    def _deliver(reply: GenerationHandle | RemoteText, new: list, end: tuple | None) -> None:
        if new:
            reply.push(new)
        if end is None:
            return
        reason, error, num_tokens, prompt_tokens = end
        if isinstance(reply, RemoteText):
            reply.finish(reason, error, num_tokens, prompt_tokens)
        else:
            reply.end(reason, None if error is None else RuntimeError(error))
