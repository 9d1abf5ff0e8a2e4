"""Who gets into the HTTP server: the API key (`ApiKeyGuard`), the body size limit (`read_body`) and the number of
chat requests admitted at once (`Admission`), with OpenAI-style error bodies (`error_response`)."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from minigpt4qwen.inference.frontends.openai_api.errors import RequestError


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) with its HTTP status."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (checked as it arrives, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {int(declared)} bytes is above the limit of {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"request body is above the limit of {limit} bytes", status=413)
    return bytes(body)


class _Counter:
    """What `Admission` uses of a `multiprocessing.Value`, for one process (no semaphore, no helper process)."""

    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


class Admission:
    """Counts the chat requests admitted (generating or waiting for the model); refuses more than `limit`.

    Args:
        limit: requests admitted at once.
        counter: a `multiprocessing.Value("i")` shared by the front-end processes that admit against one limit
            (None: a counter of this process's own).
    """

    def __init__(self, limit: int, counter: Any = None):
        self.limit = limit
        self._counter = counter if counter is not None else _Counter()

    @property
    def admitted(self) -> int:
        return self._counter.value

    def enter(self) -> Callable[[], None] | None:
        """A release function for an admitted request (idempotent), or None when `limit` are in already."""
        with self._counter.get_lock():
            if self._counter.value >= self.limit:
                return None
            self._counter.value += 1
        released = threading.Event()

        def release() -> None:
            with self._counter.get_lock():
                if not released.is_set():
                    released.set()
                    self._counter.value -= 1

        return release


class ApiKeyGuard:
    """ASGI middleware: `/v1/*` requests need `Authorization: Bearer <api_key>`, or get 401 with their body unread.

    A plain ASGI wrapper rather than Starlette's `BaseHTTPMiddleware`, which relays every chunk of a streamed reply
    through an extra task and queue: work on the event loop that the scheduler's thread competes with for the GIL.
    """

    def __init__(self, app: Callable, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and _route(scope).startswith("/v1/"):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                         "<key>' (the openai client's api_key)", code="invalid_api_key")
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route(scope: dict) -> str:
    """The request's path below the app's mount point (ASGI's `path` includes `root_path`, e.g. behind a proxy
    with uvicorn's --root-path or under a Starlette Mount)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
