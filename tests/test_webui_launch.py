"""`launch` and `minigpt4qwen webui` without a browser: the startup log names the CLI's `--share` flag, not gradio's
`share=True`; the generation scheduler is built from the options and closed on the way out."""

import socket
import threading

import gradio as gr
import pytest

from minigpt4qwen.inference.frontends.webui import launch
from tests.conftest import make_tiny_chat_model

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations


def _free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _schedulers():
    return [thread for thread in threading.enumerate() if thread.name == "minigpt4qwen-scheduler"]


def test_startup_log_names_the_share_flag_and_the_scheduler_closes(monkeypatch, capsys):
    port = _free_port()
    served, before = [], _schedulers()

    def serve_then_stop(app):  # instead of waiting for Ctrl-C
        served.append((app.local_url, len(_schedulers())))
        app.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", serve_then_stop)
    launch(*make_tiny_chat_model(), port=port)
    out = capsys.readouterr().out
    assert served == [(f"http://127.0.0.1:{port}/", len(before) + 1)]  # its own scheduler ran while it served
    assert _schedulers() == before
    assert f"Running on local URL:  http://127.0.0.1:{port}/" in out
    assert "restart with --share" in out and "share=True" not in out



def test_the_webui_command_builds_its_scheduler_from_the_options_and_closes_it(monkeypatch):
    import minigpt4qwen.inference.loading as loading
    import minigpt4qwen.inference.scheduler_options as scheduler_options
    from minigpt4qwen.cli.main import build_parser

    build, built, served = scheduler_options.build_scheduler, [], []

    def recorded(*args):
        built.append(build(*args))
        return built[-1]

    def serve_then_stop(app):
        served.append(_schedulers())
        app.close()

    monkeypatch.setattr(loading, "load_for_inference", lambda args: make_tiny_chat_model())
    monkeypatch.setattr(scheduler_options, "build_scheduler", recorded)
    monkeypatch.setattr(gr.Blocks, "block_thread", serve_then_stop)
    args = build_parser().parse_args(["webui", "--port", str(_free_port()), "--slots", "2", "--slot-tokens", "300",
                                      "--compile-decode"])
    assert args.func(args) == 0
    [scheduler] = built
    assert (scheduler.slots, scheduler.capacity) == (2, 300)
    decoder = scheduler.decoder  # --compile-decode: the step is wrapped by torch.compile (compiled on first use)
    assert hasattr(decoder._decode_forward, "_torchdynamo_orig_callable")
    assert len(served) == 1 and scheduler._thread in served[0]  # it ran while the UI served
    assert not scheduler._thread.is_alive()  # and was closed on the way out


def test_each_visitor_gets_a_chat_session_when_the_page_loads():
    from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
    from minigpt4qwen.inference.frontends.chat_tab import ChatTab
    from minigpt4qwen.inference.frontends.webui import build_app

    model, tokenizer = make_tiny_chat_model()
    scheduler = GenerationScheduler(model, tokenizer, slots=2, capacity=128)
    try:
        app = build_app(model, tokenizer, scheduler)
        [state] = [block for block in app.blocks.values() if isinstance(block, gr.State)]
        # Made per page load, not on the first event: an upload and a question sent at once share one session.
        first, second = state.value(), state.value()
        assert isinstance(first, ChatTab) and isinstance(second, ChatTab) and first.session is not second.session
        app.close()
    finally:
        scheduler.close()
