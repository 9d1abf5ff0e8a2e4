"""The gradio web UI, launched on 127.0.0.1 and driven by a real headless Chromium through Playwright.

Replies go through a `GenerationScheduler`; the expected answers are its answers to the same prompts, submitted
directly (two tabs decoding together: tests/test_chat_tab.py).
"""

import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.chat_tab import STOPPED
from tests.conftest import make_tiny_chat_model

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium chromium-driver)"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # gradio's own pandas deprecations
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
N = 20  # max new tokens set through the UI
LONG = 2000  # max new tokens of a reply that would take ~30 s: long enough to be stopped in the middle
STEPS = []  # one entry per forward pass of the LLM: a generation that has stopped adds none
CAPACITY = 8192  # tokens per scheduler slot: more than the 6144-token prompt budget, which then applies


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # Images must give different answers: the image path gets larger random weights.
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    # Only words, single spaces and the stop tokens may come out: the chat renders markdown, and random
    # punctuation would not read back as the same text.
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    allowed = [tok.isalpha() or tok == " " or tok in ("<|im_end|>", "<|endoftext|>") for tok in vocab]
    bias = torch.where(torch.tensor(allowed), 0.0, -1e4)
    model.language_model.lm_head.register_forward_hook(lambda module, args, out: out + bias)

    def slowly(module, args):  # ~15 ms a token, so the browser sees the reply grow
        STEPS.append(None)
        time.sleep(0.015)

    model.language_model.get_decoder().register_forward_pre_hook(slowly)  # the scheduler calls it, not the LM
    return model, tokenizer


@pytest.fixture(scope="module")
def scheduler(model_and_tokenizer):
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=4, capacity=CAPACITY)
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="module")
def url(model_and_tokenizer, scheduler):
    from minigpt4qwen.inference.frontends.webui import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    app = build_app(*model_and_tokenizer, scheduler)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url):
    page = browser.new_page()  # a browser tab: its own gradio session
    page.set_default_timeout(20_000)
    page.goto(url)
    return page


@pytest.fixture(scope="module")
def page(browser, url):
    return _open(browser, url)


def _answer(scheduler, session, text, settings, record=True):
    """The scheduler's answer to `text` in `session` (recorded as a turn unless `record` is False)."""
    query = session.with_image_markers(text)
    ids, features = session.build_prompt(query)
    reply = scheduler.submit(ids, image_features=features, settings=settings).result(timeout=60)
    if record:
        session.record_turn(query, reply)
    return reply


def _words(text):
    return " ".join(text.split())  # the page collapses runs of spaces


def _bot_texts(page):
    return [_words(t) for t in page.locator("#chatbot [data-testid=bot]").all_inner_texts()]


def _wait_for_reply(page, count, expected):
    """Polls the last of `count` replies until it reads `expected`; returns every distinct text seen on the way."""
    seen, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        texts = _bot_texts(page)
        if len(texts) == count and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        if seen and seen[-1] == _words(expected):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"reply {count}: expected {expected!r}, last seen {seen[-1:]!r}")


def _ask(page, question):
    page.fill("#query textarea", question)
    page.click("#send")


def _set_number(page, elem_id, value):
    page.fill(f"#{elem_id} input[type=number]", str(value))
    page.press(f"#{elem_id} input[type=number]", "Enter")


def _no_generation_running():
    """Whether the LLM stays idle for a while (a running generation takes a step every ~15 ms)."""
    before = len(STEPS)
    time.sleep(0.3)
    return len(STEPS) == before


def _start_long_reply(page, question, count):
    """Asks `question` with LONG max new tokens and waits until reply `count` is streaming."""
    _set_number(page, "max-new-tokens", LONG)
    _ask(page, question)
    page.wait_for_function(f"(document.querySelectorAll('#chatbot [data-testid=bot]')[{count - 1}]?.innerText"
                           " ?? '').length > 5")


def _wait_for_empty_chat(page):
    """The chat shows no message within 5 s (it takes ~0.1 s; a reply left running would need ~30 s more)."""
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]')"
                           ".length === 0", timeout=5_000)


def test_upload_ask_stream_change_controls_regenerate_and_restart(page, model_and_tokenizer, scheduler, tmp_path):
    red = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(red)
    greedy = GenerationSettings(max_new_tokens=N)
    sampled = GenerationSettings(max_new_tokens=N, do_sample=True, temperature=1.5, seed=7)
    engine = ChatSession(*model_and_tokenizer)
    engine.add_image(Image.open(red))
    first = _answer(scheduler, engine, "what colour", greedy)
    second = _answer(scheduler, engine, "what shape", sampled, record=False)
    regenerated = _answer(scheduler, engine, "what shape", GenerationSettings(
        max_new_tokens=N, do_sample=True, temperature=1.5, seed=8))
    penalised = GenerationSettings(max_new_tokens=N, repetition_penalty=1.5)
    after_restart = _answer(scheduler, ChatSession(*model_and_tokenizer), "what colour", penalised)
    unpenalised = _answer(scheduler, ChatSession(*model_and_tokenizer), "what colour", greedy)
    assert len({first, second, regenerated, after_restart, unpenalised}) == 5 and len(first) > 10

    page.set_input_files("#images input[type=file]", str(red))
    page.locator("#chatbot [data-testid=user] img").first.wait_for()
    page.fill("#max-new-tokens input[type=number]", str(N))
    page.press("#max-new-tokens input[type=number]", "Enter")
    _ask(page, "what colour")
    seen = _wait_for_reply(page, 1, first)
    partial = [s for s in seen if s and s != _words(first)]
    assert partial and all(_words(first).startswith(s) for s in partial), f"not streamed: {seen}"

    page.check("#do-sample input[type=checkbox]")
    page.fill("#temperature input[type=number]", "1.5")
    page.press("#temperature input[type=number]", "Enter")
    page.fill("#seed textarea", "7")
    _ask(page, "what shape")
    _wait_for_reply(page, 2, second)

    page.fill("#seed textarea", "8")
    page.click("#regenerate")
    _wait_for_reply(page, 2, regenerated)
    assert _bot_texts(page)[0] == _words(first)

    page.click("#restart")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user]').length === 0")
    page.uncheck("#do-sample input[type=checkbox]")
    _set_number(page, "repetition-penalty", 1.5)
    _ask(page, "what colour")
    _wait_for_reply(page, 1, after_restart)
    assert page.locator("#chatbot [data-testid=user] img").count() == 0
    _set_number(page, "repetition-penalty", 1)


def test_stop_clear_and_restart_end_a_streamed_reply_at_once(page, model_and_tokenizer, scheduler):
    greedy = GenerationSettings(max_new_tokens=N)
    shape = _answer(scheduler, ChatSession(*model_and_tokenizer), "what shape", greedy)
    colour = _answer(scheduler, ChatSession(*model_and_tokenizer), "what colour", greedy)
    page.click("#restart")
    _wait_for_empty_chat(page)
    page.fill("#seed textarea", "")

    _start_long_reply(page, "what shape", 1)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#chatbot [data-testid=bot]').innerText.endsWith('(stopped)')",
                           timeout=5_000)
    assert _no_generation_running()
    stopped = _bot_texts(page)[0].removesuffix("(stopped)").strip()
    assert stopped and _words(shape)[:len(stopped)] == stopped[:len(_words(shape))]  # greedy: same start
    _set_number(page, "max-new-tokens", N)
    page.click("#regenerate")  # a stopped question is asked again (it was not added to the history)
    _wait_for_reply(page, 1, shape)

    _start_long_reply(page, "what colour", 2)
    page.click("#clear-history")
    _wait_for_empty_chat(page)
    assert _no_generation_running() and not _bot_texts(page)  # and no late update brought the old turns back
    _set_number(page, "max-new-tokens", N)
    _ask(page, "what colour")
    _wait_for_reply(page, 1, colour)  # the history is gone: answered as in a new conversation

    _start_long_reply(page, "what shape", 2)
    page.click("#restart")
    _wait_for_empty_chat(page)
    assert _no_generation_running() and not _bot_texts(page)  # and no late update brought the old turns back
    _set_number(page, "max-new-tokens", N)

    too_long = "red " * 3100  # 6200 words and spaces: over the 6144-token prompt budget
    _ask(page, too_long)
    page.get_by_text("over the prompt budget of 6,144 tokens").wait_for()
    assert not _bot_texts(page) and page.input_value("#query textarea") == too_long  # kept, to be shortened


def test_a_second_tab_is_answered_while_the_first_streams(browser, url, page, model_and_tokenizer, scheduler):
    colour = _answer(scheduler, ChatSession(*model_and_tokenizer), "what colour", GenerationSettings(max_new_tokens=N))
    shape = _answer(scheduler, ChatSession(*model_and_tokenizer), "what shape", GenerationSettings(max_new_tokens=N))
    page.click("#restart")
    _wait_for_empty_chat(page)
    _start_long_reply(page, "what shape", 1)  # ~30 s of reply: the second tab would wait for it, were they serialised

    other = _open(browser, url)
    _set_number(other, "max-new-tokens", N)
    _ask(other, "what colour")
    _wait_for_reply(other, 1, colour)
    streaming = _bot_texts(page)[0]
    assert scheduler.stats()["active_slots"] == 1 and not streaming.endswith(STOPPED)  # the first is still going
    page.click("#stop")
    page.wait_for_function(f"document.querySelector('#chatbot [data-testid=bot]').innerText.endsWith('{STOPPED}')",
                           timeout=5_000)
    stopped = _bot_texts(page)[0].removesuffix(STOPPED).strip()
    assert len(stopped) >= len(streaming) and stopped[:len(_words(shape))] == _words(shape)[:len(stopped)]
    other.close()
    _set_number(page, "max-new-tokens", N)
