"""`launch`'s startup log, without a browser: it names the CLI's `--share` flag, not gradio's `share=True`."""

import socket

import gradio as gr
import pytest

from minigpt4qwen.inference.frontends.webui import launch
from tests.conftest import make_tiny_chat_model

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations


def test_startup_log_names_the_share_flag(monkeypatch, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    served = []

    def serve_then_stop(app):  # instead of waiting for Ctrl-C
        served.append(app.local_url)
        app.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", serve_then_stop)
    launch(*make_tiny_chat_model(), port=port)
    out = capsys.readouterr().out
    assert served == [f"http://127.0.0.1:{port}/"]
    assert f"Running on local URL:  http://127.0.0.1:{port}/" in out
    assert "restart with --share" in out and "share=True" not in out
