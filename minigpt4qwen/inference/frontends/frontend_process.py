"""`serve --frontend-process`: the HTTP server in a process of its own, the model and its scheduler in this one.

    frontend = FrontendProcess(model, tokenizer, scheduler, FrontendOptions(port=8000))
    frontend.start()
    frontend.run()      # serves until the front end exits (Ctrl-C, or `frontend.stop()` from another thread)

The front-end process (spawned: it starts without CUDA and without the model) runs the same app as `serve`
(`create_app`) over an `engine_link.RemoteBackend`; this process answers it with an `EngineBridge`. Why: see
`engine_link`.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.frontends.engine_link import EngineBridge, RemoteBackend
from minigpt4qwen.inference.frontends.local_backend import LocalBackend
from minigpt4qwen.inference.frontends.openai_protocol import PromptSpec
from minigpt4qwen.inference.frontends.server import create_app
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)


@dataclass
class FrontendOptions:
    """Where and how the front end serves.

    Attributes:
        host / port: the address to bind ("0.0.0.0" exposes it to the network: set an api_key then).
        model_name: the id reported to clients.
        allow_local_files: accept local image paths (see `build_app`).
        app_options: further `create_app` keyword arguments (max_body_bytes, ..., api_key, max_queue).
        log_level: uvicorn's.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "minigpt4qwen"
    allow_local_files: bool = False
    app_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


def run_frontend(connection: Any, tokenizer: PreTrainedTokenizerBase, spec: PromptSpec, capacity: int,
                 options: FrontendOptions) -> None:
    """The front-end process: the app over the engine's connection, until interrupted or the engine goes."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backend = RemoteBackend(connection, tokenizer, spec, capacity)
    app = create_app(backend, tokenizer, options.model_name, options.allow_local_files, **options.app_options)
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level))

    def engine_lost() -> None:
        log.error("%s", "the model's process has gone: stopping the HTTP server")
        server.should_exit = True

    backend.on_lost = engine_lost
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        raise SystemExit(1)


class FrontendProcess:
    """Runs `run_frontend` in a spawned process and answers it from this one.

    Args:
        model: the model (its scheduler decodes on it).
        tokenizer: its tokenizer (sent to the front end).
        scheduler: the model's scheduler (owned by the caller).
        options: the front end's address and app options.
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, scheduler: GenerationScheduler,
                 options: FrontendOptions):
        self.model, self.tokenizer, self.scheduler, self.options = model, tokenizer, scheduler, options
        self.process: multiprocessing.process.BaseProcess | None = None
        self._connection: Any = None

    def start(self) -> None:
        """Spawns the front end (it serves once it has the engine's first stats)."""
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self.process = context.Process(
            target=run_frontend, name="minigpt4qwen-frontend", daemon=True,
            args=(theirs, self.tokenizer, PromptSpec.of(self.model), self.scheduler.capacity, self.options))
        self.process.start()
        theirs.close()  # the front end's end now lives there only: its exit reads as EOF here

    def run(self) -> int:
        """Serves the front end's requests until it exits; returns its exit code (0 when stopped by a signal)."""
        try:
            EngineBridge(self._connection, LocalBackend(self.model, self.tokenizer, self.scheduler)).run()
        except KeyboardInterrupt:  # Ctrl-C reaches the front end too (one process group); else it is told here
            log.info("interrupted: stopping the HTTP front end")
            self.stop()
        finally:
            self._connection.close()
            self.process.join(30)
        code = self.process.exitcode
        # uvicorn shuts down gracefully on SIGTERM / SIGINT, then ends by the same signal
        return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else -1 if code is None else code

    def stop(self) -> None:
        """Asks the front end to shut down (as Ctrl-C does); `run` then returns."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
