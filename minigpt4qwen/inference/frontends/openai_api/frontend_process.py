"""`serve --frontend-processes N`: the HTTP server in N processes of their own, the model and its scheduler in this
one.

    frontends = FrontendProcesses(model, tokenizer, scheduler, FrontendOptions(port=8000), count=4)
    frontends.start()
    frontends.run()     # serves until the front ends exit (Ctrl-C, or `frontends.stop()` from another thread)

Each front-end process (spawned: it starts without CUDA and without the model) runs the same app as `serve`
(`create_app`) over an `engine_link.RemoteBackend`; this process answers each with an `EngineBridge` thread, all
submitting to the one scheduler. This process binds the port (so a taken one is reported before anything starts),
one SO_REUSEPORT socket per front end, and the kernel spreads the connections over them: a burst of requests is
parsed, decoded and tokenized on several cores at once. Why a process at all: see `engine_link`.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.frontends.openai_api.engine_link import EngineBridge, RemoteBackend
from minigpt4qwen.inference.frontends.openai_api.local_backend import LocalBackend
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import PromptSpec
from minigpt4qwen.inference.frontends.openai_api.server import create_app
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 30


@dataclass
class FrontendOptions:
    """Where and how the front ends serve.

    Attributes:
        host / port: the address to bind ("0.0.0.0" exposes it to the network: set an api_key then).
        model_name: the id reported to clients.
        allow_local_files: accept local image paths (see `build_app`).
        app_options: further `create_app` keyword arguments (max_body_bytes, ..., api_key, max_queue: counted
            across all front ends).
        log_level: uvicorn's.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "minigpt4qwen"
    allow_local_files: bool = False
    app_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on one (host, port) with SO_REUSEPORT, one per front end: the kernel spreads new
    connections over them (front ends sharing one socket would not: the first to wake accepts a whole burst).

    Raises:
        OSError: the port is taken by another program (or the host is not this machine's), with the address.
    """
    sockets: list[socket.socket] = []
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        for _ in range(count):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            address = sock.getsockname()  # port 0: the others take the port the first one got
            sock.listen(2048)
    except OSError as err:
        for sock in sockets:
            sock.close()
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sockets


def run_frontend(connection: Any, sock: socket.socket, admitted: Any, tokenizer: PreTrainedTokenizerBase,
                 spec: PromptSpec, capacity: int, options: FrontendOptions) -> None:
    """A front-end process: the app over the engine's connection, accepting on `sock` and counting its admitted
    requests in the shared `admitted`, until interrupted or the engine goes."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backend = RemoteBackend(connection, tokenizer, spec, capacity)
    app = create_app(backend, tokenizer, options.model_name, options.allow_local_files, admission_counter=admitted,
                     **options.app_options)
    # Graceful shutdown waits for the replies in flight, but not forever (a client that never sends its body).
    server = uvicorn.Server(uvicorn.Config(app, log_level=options.log_level,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))

    def engine_lost() -> None:
        log.error("%s", "the model's process has gone: stopping the HTTP server")
        server.should_exit = True

    backend.on_lost = engine_lost
    if backend.lost:  # it went before `on_lost` was set
        engine_lost()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass


class FrontendProcesses:
    """Runs `run_frontend` in `count` spawned processes and answers them from this one.

    Args:
        model: the model (its scheduler decodes on it).
        tokenizer: its tokenizer (sent to the front ends).
        scheduler: the model's scheduler (owned by the caller).
        options: the front ends' address and app options.
        count: front-end processes.
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, scheduler: GenerationScheduler,
                 options: FrontendOptions, count: int = 1):
        if count < 1:
            raise ValueError(f"need at least one front-end process, got {count}")
        self.model, self.tokenizer, self.scheduler, self.options = model, tokenizer, scheduler, options
        self.count = count
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._connections: list[Any] = []
        self.port: int | None = None  # the port listened on (the one chosen by the system for port 0)
        self._stop_requested = False

    def start(self) -> None:
        """Binds the port and spawns the front ends (each serves once it has the engine's first stats).

        Raises:
            OSError: the port is taken.
        """
        sockets = listening_sockets(self.options.host, self.options.port, self.count)
        self.port = sockets[0].getsockname()[1]
        context = multiprocessing.get_context("spawn")
        spec = PromptSpec.of(self.model)
        # Requests admitted by all front ends, against one max_queue (kept here: the children unpickle it later).
        self._admitted = admitted = context.Value("i", 0)
        try:
            for index, sock in enumerate(sockets):
                ours, theirs = context.Pipe()
                process = context.Process(target=run_frontend, name=f"minigpt4qwen-frontend-{index}", daemon=True,
                                          args=(theirs, sock, admitted, self.tokenizer, spec,
                                                self.scheduler.capacity, self.options))
                process.start()
                theirs.close()  # the front end's end now lives there only: its exit reads as EOF here
                self.processes.append(process)
                self._connections.append(ours)
        finally:
            for sock in sockets:
                sock.close()  # the front ends hold them now

    def run(self) -> int:
        """Serves the front ends' requests until one exits (then stops the others) or a SIGTERM / Ctrl-C comes (the
        front ends then finish the replies in flight); returns the first non-zero exit code (0 when stopped)."""
        backend = LocalBackend(self.model, self.tokenizer, self.scheduler)
        bridges = [threading.Thread(target=EngineBridge(connection, backend).run, daemon=True,
                                    name=f"minigpt4qwen-bridge-{i}") for i, connection in enumerate(self._connections)]
        for bridge in bridges:
            bridge.start()
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda *_: self.stop()) if on_main_thread else None
        try:
            try:
                while all(bridge.is_alive() for bridge in bridges):
                    time.sleep(0.2)
            except KeyboardInterrupt:  # Ctrl-C reaches the front ends too (one process group), else they are told
                log.info("interrupted: stopping the HTTP front ends")
                self._stop_requested = True
            finally:
                asked = self._stop_requested  # before the front ends were told to stop here
                self.stop()  # one front end gone (it failed, or was stopped): stop them all
                for process in self.processes:  # they drain (up to GRACEFUL_SHUTDOWN_S), else are killed
                    process.join(GRACEFUL_SHUTDOWN_S + 10)
                    if process.exitcode is None:
                        process.kill()
                        process.join()
                for bridge in bridges:
                    bridge.join(10)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._exit_code(asked)

    def _exit_code(self, asked: bool) -> int:
        """The first failure among the front ends' exits, else 0. uvicorn ends by the signal it shut down for (a
        stop); a front end that exits by itself without being asked (its link broke) counts as a failure."""
        for process in self.processes:
            code = process.exitcode
            if code in (-signal.SIGTERM, -signal.SIGINT) or (code == 0 and asked):
                continue
            return code or 1
        return 0

    def stop(self) -> None:
        """Asks the front ends to shut down (as Ctrl-C does); `run` then returns."""
        self._stop_requested = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()
