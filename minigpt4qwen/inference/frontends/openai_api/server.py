"""An OpenAI-compatible HTTP server: `POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /health`.

    serve(model, tokenizer, "minigpt4qwen", port=8000)   # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Each request's prompt is built from its own messages and handed to the `GenerationScheduler`, which decodes every
request in flight together (continuous batching, each with its own settings, images and history); up to
`max_queue` requests are admitted at once (decoding or waiting for a slot), more get 429 with Retry-After. Beam
search is not batched: it runs alone on the model between decode steps. A client that disconnects from a stream
frees its slot at the next step. With an `api_key`, `/v1/*` requests need `Authorization: Bearer <key>` (what
OpenAI clients send). `/health` reports the slots in use, the queue and the tokens/s of the last 10 seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler, SchedulerUnavailable
from minigpt4qwen.inference.engine import GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.admission import Admission, ApiKeyGuard, error_response, read_body
from minigpt4qwen.inference.frontends.openai_api.errors import RequestError
from minigpt4qwen.inference.frontends.openai_api.local_backend import Backend, LocalBackend
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import ChatRequest, Conversation, build_conversation
from minigpt4qwen.inference.frontends.openai_api.request_images import ImageLimits
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)
MiB = 1024 * 1024
CLIENT_CLOSED_REQUEST = 499  # the status logged for a request whose client left before its reply (nginx's)
STALE_STATS_S = 5.0  # /health answers 503 when the model's process has sent no stats for this long


def _location(loc: tuple) -> str:
    """A pydantic error location as a field path, without union branch names ("str", "list[...]", a part's tag)."""
    names = [str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x not in ("str", "list"))]
    return ".".join(n for i, n in enumerate(names) if i == 0 or n != names[i - 1]) or "body"


async def _joined(reply: AsyncIterable[str]) -> str:
    return "".join([piece async for piece in reply])


async def _unless_client_leaves(request: Request, work: Awaitable[str]) -> str | None:
    """`work`'s result, or None (`work` cancelled) once the client closes its connection first: a non-streamed
    reply would otherwise hold its slot to the last token for nobody (an OpenAI client that timed out retries)."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only a hang-up is left
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (a shutdown): so is the reply
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def _parse(body: bytes) -> ChatRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as err:
        details = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in err.errors())
        raise RequestError(f"invalid request: {details}") from None  # 400, as OpenAI answers


def build_app(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, model_name: str = "minigpt4qwen",
              allow_local_files: bool = False, *, scheduler: GenerationScheduler | None = None, slots: int = 16,
              slot_tokens: int = 2048, **options: Any) -> FastAPI:
    """Builds the FastAPI app serving `model` from this process.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        model_name: the id reported by `/v1/models` and in responses (requests may name any model).
        allow_local_files: also accept `image_url` local paths and file:// URLs (only for trusted clients: they
            can read any image the server process can).
        scheduler: the model's generation scheduler (owned by the caller); None builds one of `slots` slots of
            `slot_tokens` tokens, closed with the app.
        slots / slot_tokens: see `scheduler`.
        **options: `create_app`'s limits (max_body_bytes, ..., api_key, max_queue).

    Returns:
        The app (run it with uvicorn, or `serve`).
    """
    own = scheduler is None
    scheduler = scheduler or GenerationScheduler(model, tokenizer, slots=slots, capacity=slot_tokens)
    app = create_app(LocalBackend(model, tokenizer, scheduler, own), tokenizer, model_name, allow_local_files,
                     **options)
    app.state.scheduler = scheduler
    return app


def create_app(backend: Backend, tokenizer: PreTrainedTokenizerBase, model_name: str = "minigpt4qwen",
               allow_local_files: bool = False, *, max_body_bytes: int = 20 * MiB, max_images: int = 8,
               max_image_pixels: int = 25_000_000, default_max_tokens: int = 512, max_tokens_limit: int = 4096,
               max_window_size: int = 6144, api_key: str | None = None, max_queue: int = 128,
               admission_counter: Any = None) -> FastAPI:
    """Builds the FastAPI app over a backend (`LocalBackend`, or `engine_link.RemoteBackend` in a front-end
    process).

    Args:
        backend: runs the requests (see `local_backend`); closed with the app.
        tokenizer: the model's tokenizer.
        model_name / allow_local_files: see `build_app`.
        max_body_bytes: larger request bodies get 413.
        max_images: more images in one request get 400.
        max_image_pixels: larger images (width x height) get 400.
        default_max_tokens: max_tokens when a request sets none.
        max_tokens_limit: larger max_tokens get 400.
        max_window_size: prompt budget in tokens (at most a slot's capacity less one); older turns are dropped
            beyond it.
        api_key: required as `Authorization: Bearer <key>` on `/v1/*` (None: no authentication).
        max_queue: chat requests admitted at once (decoding or waiting for a slot); more get 429.
        admission_counter: a `multiprocessing.Value("i")` counting the admitted requests of several front-end
            processes against one `max_queue` (None: this app's own).
    """
    window = min(max_window_size, backend.capacity - 1)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        backend.close()

    app = FastAPI(title="MiniGPT4Qwen", version="1", lifespan=lifespan)
    admission = Admission(max_queue, admission_counter)
    limits = ImageLimits(max_images=max_images, max_pixels=max_image_pixels, allow_local_files=allow_local_files)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:  # a bug: logged, and OpenAI's error body
        return error_response(500, f"internal error: {err}", kind="server_error")

    if api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=api_key)

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        stats = backend.stats()
        if stats.get("stats_age_s", 0) > STALE_STATS_S:  # a front end whose model's process stopped answering
            return JSONResponse({"status": "engine not responding", "model": model_name, **stats}, status_code=503)
        return {"status": "ok", "model": model_name, "busy": bool(stats["active_slots"] or stats["queued"]),
                "admitted": admission.admitted, **stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minigpt4qwen"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, max_body_bytes)
        chat = _parse(body)
        settings = chat.settings(default_max_tokens, max_tokens_limit)
        release = admission.enter()
        if release is None:
            return error_response(429, f"the server is busy: {max_queue} requests are generating or waiting; retry "
                                  "later", kind="server_busy", code="queue_full", headers={"Retry-After": "1"})
        try:
            return await _complete(request, chat, settings, release)
        except BaseException:
            release()
            raise

    def _prepare(chat: ChatRequest, settings: GenerationSettings) -> tuple[Conversation, Any]:
        """The conversation and, unless beam search runs, its prompt ids and pixels: CPU work (image decoding,
        tokenizing) done in one worker-thread hop, so a request costs the event loop one round trip."""
        conversation = build_conversation(chat, limits)
        if settings.num_beams > 1:  # its images at the model's size: cheap to send to another process (same pixels)
            return conversation.resized(backend.spec.image_size), None
        return conversation, conversation.prompt(backend.spec, tokenizer, window)

    async def _start(chat: ChatRequest, settings: GenerationSettings) -> tuple[Any, Callable[[], int]]:
        """The reply (async-iterable text pieces with `num_tokens` and `finish_reason`) and its prompt length."""
        conversation, prompt = await run_in_threadpool(_prepare, chat, settings)
        if prompt is None:  # beam search runs alone on the model, between the scheduler's steps
            try:
                return backend.beam(conversation, settings, window)
            except SchedulerUnavailable as err:
                raise RequestError(f"the model is not serving: {err}", status=503) from None
        try:
            handle = backend.submit(*prompt, settings)
        except ValueError as err:
            raise RequestError(str(err)) from None
        except SchedulerUnavailable as err:
            raise RequestError(f"the model is not serving: {err}", status=503) from None
        return handle, lambda: handle.prompt_tokens

    async def _complete(request: Request, chat: ChatRequest, settings: GenerationSettings,
                        release: Callable[[], None]) -> Response:
        """Answers an admitted request; `release` ends its admission once the reply is complete or abandoned."""
        reply, prompt_tokens = await _start(chat, settings)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage_dict() -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens(), "completion_tokens": reply.num_tokens,
                    "total_tokens": prompt_tokens() + reply.num_tokens}

        if not chat.streams:
            try:
                text = await _unless_client_leaves(request, _joined(reply))
            except Exception as err:  # a bug, an out-of-memory, a bad image: the client gets a 500, the rest go on
                log.exception("generation failed")
                return error_response(500, f"generation failed: {err}", kind="server_error")
            finally:
                release()
            if text is None:  # the client hung up (a timeout, a retry): its slot was freed at the next step
                reply.cancel()
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": usage_dict(),
            })

        # With include_usage every chunk carries "usage", null but in the last (OpenAI's stream format).
        usage_field = {"usage": None} if chat.usage_in_stream else {}

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": choices, **usage_field, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def delta(content: dict[str, str], finish_reason: str | None = None) -> str:
            return event([{"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}])

        async def events() -> AsyncIterator[str]:
            yield delta({"role": "assistant", "content": ""})
            try:
                async for piece in reply:
                    yield delta({"content": piece})
            except Exception as err:  # headers are sent: report in the stream, as OpenAI does
                log.exception("generation failed")
                error = {"message": f"generation failed: {err}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                yield delta({}, reply.finish_reason)
                if chat.usage_in_stream:
                    yield event([], usage=usage_dict())
            finally:
                release()
            yield "data: [DONE]\n\n"

        # The background task also releases (and the handle's cancel frees the slot of) a stream whose client left
        # before it started.
        def abandon() -> None:
            release()
            reply.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(abandon))

    return app


def serve(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, model_name: str = "minigpt4qwen", *,
          host: str = "127.0.0.1", port: int = 8000, allow_local_files: bool = False, **limits: Any) -> None:
    """Runs the server until interrupted (binds 127.0.0.1 unless `host` says otherwise).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        model_name: the id reported to clients.
        host: interface to bind ("0.0.0.0" exposes it to the network: set `api_key` in `limits` then).
        port: TCP port.
        allow_local_files: accept local image paths (see `build_app`).
        **limits: further `build_app` keyword arguments (max_body_bytes, max_images, ..., api_key, max_queue,
            scheduler or slots and slot_tokens).
    """
    app = build_app(model, tokenizer, model_name, allow_local_files, **limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
