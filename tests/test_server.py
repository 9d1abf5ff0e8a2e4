"""The OpenAI-compatible server, run for real by uvicorn and driven with the official `openai` client."""

import base64
import io
import random
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.server import build_app
from tests.conftest import make_tiny_chat_model

N = 24  # max_tokens of most requests: the random tiny model rarely stops by itself


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # Images must give different answers: the image path gets larger random weights.
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    return model, tokenizer


@contextmanager
def _serving(app):
    """Runs `app` with uvicorn in a thread on a free port of 127.0.0.1; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with _serving(build_app(model, tokenizer, "tiny", max_body_bytes=100_000, max_images=3)) as url:
        yield url


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _image(color, size=40):
    return Image.new("RGB", (size, size), color)


def _noise(size):
    return Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3))


def _data_uri(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _user(text, *images):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _data_uri(i)}} for i in images),
                                        {"type": "text", "text": text}]}


def _engine(model_and_tokenizer, turns, settings):
    """The engine's answer: `turns` is [(question, images), ...]; every reply but the last is the engine's own."""
    session, replies = ChatSession(*model_and_tokenizer), []
    for question, images in turns:
        for image in images:
            session.add_image(image)
        replies.append(session.ask(question, settings))
    return replies


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_greedy_answers_match_the_engine_across_turns(client, model_and_tokenizer):
    red = _image("red")
    first, second = _engine(model_and_tokenizer, [("what colour", [red]), ("what shape", [])],
                            GenerationSettings(max_new_tokens=N))
    messages = [_user("what colour", red)]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == first and out.object == "chat.completion"
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > model_and_tokenizer[0].num_query_tokens
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "what shape"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=N)
    assert out.choices[0].message.content == second


def test_streaming_sends_openai_chunks_with_the_same_answer(client, model_and_tokenizer):
    blue = _image("blue")
    [expected] = _engine(model_and_tokenizer, [("what is the shape", [blue])], GenerationSettings(max_new_tokens=N))
    chunks = list(client.chat.completions.create(model="tiny", messages=[_user("what is the shape", blue)],
                                                 max_tokens=N, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_concurrent_clients_get_their_own_answers_one_generation_at_a_time(client, model_and_tokenizer, monkeypatch):
    model, _ = model_and_tokenizer
    images = {"red": _image("red"), "blue": _image((0, 0, 255)), "white": _image("white")}
    expected = {k: _engine(model_and_tokenizer, [("what colour", [im])], GenerationSettings(max_new_tokens=N))[0]
                for k, im in images.items()}
    assert len(set(expected.values())) == len(images), "the tiny model must tell these images apart"
    active, peak, forward = [0], [0], model.language_model.forward

    def slow_forward(*args, **kwargs):  # a slower model, so the requests really overlap
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.004)
        try:
            return forward(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(model.language_model, "forward", slow_forward)
    answers, start = {}, threading.Barrier(len(images))

    def ask(key, stream):
        start.wait()
        out = client.chat.completions.create(model="tiny", messages=[_user("what colour", images[key])], max_tokens=N,
                                             stream=stream)
        answers[key] = ("".join(c.choices[0].delta.content or "" for c in out) if stream
                        else out.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(key, i % 2 == 0)) for i, key in enumerate(images)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == expected and peak[0] == 1


def test_a_dropped_stream_stops_its_generation(base_url, model_and_tokenizer, monkeypatch):
    model, _ = model_and_tokenizer
    steps, forward = [0], model.language_model.forward

    def slow_forward(*args, **kwargs):
        steps[0] += 1
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.language_model, "forward", slow_forward)
    request = {"messages": [_user("what", _image("red"))], "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=request) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: hang up
    deadline = time.monotonic() + 5
    while httpx.get(f"{base_url}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not httpx.get(f"{base_url}/health").json()["busy"] and steps[0] < 100  # 600+ without the hang-up
    assert httpx.get(f"{base_url}/health").json()["admitted"] == 0  # the dropped stream left the queue


def test_api_key_is_required_when_set(model_and_tokenizer):
    with _serving(build_app(*model_and_tokenizer, "tiny", api_key="s3cret")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            wrong.models.list()
        assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401  # no header; body unread
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        reply = right.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=4)
        assert reply.choices[0].message.content is not None
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key


def test_a_full_queue_gets_429_and_frees_up(model_and_tokenizer, monkeypatch):
    model, _ = model_and_tokenizer
    forward, started, go = model.language_model.forward, threading.Event(), threading.Event()

    def held_forward(*args, **kwargs):  # the first generation waits until the test lets it go
        started.set()
        go.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.language_model, "forward", held_forward)
    with _serving(build_app(model, model_and_tokenizer[1], "tiny", max_queue=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        first = threading.Thread(target=lambda: client.chat.completions.create(
            model="tiny", messages=[_user("what")], max_tokens=2))
        first.start()
        assert started.wait(30)
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=2)
        go.set()
        first.join(30)
        assert client.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=2).choices


def test_stop_strings_seed_and_length(client, model_and_tokenizer):
    green = _image("green")
    [full] = _engine(model_and_tokenizer, [("what", [green])], GenerationSettings(max_new_tokens=N))
    stop = full.split()[2]
    [cut] = _engine(model_and_tokenizer, [("what", [green])], GenerationSettings(max_new_tokens=N, stop=(stop,)))
    out = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N, stop=[stop])
    assert out.choices[0].message.content == cut and stop not in cut and out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut

    sampled = GenerationSettings(max_new_tokens=N, do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    [expected] = _engine(model_and_tokenizer, [("what", [green])], sampled)
    for _ in range(2):
        out = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N,
                                             temperature=1.5, top_p=0.9, seed=5)
        assert out.choices[0].message.content == expected
    out = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=2)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 2


def _image_url(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("messages, status, message", [
    (_image_url("data:text/plain;base64,aGk="), 400, "data:image"),
    (_image_url("data:image/png;base64,aGVsbG8="), 400, "not a decodable image"),
    (_image_url("data:image/png;base64,%%%"), 400, "not valid base64"),
    (_image_url("/etc/hostname"), 400, "--allow-local-files"),
    (_image_url("https://example.com/a.png"), 400, "remote image URLs"),
    ([_user("many", *[_image("red")] * 4)], 400, "at most 3"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], 400, "last message"),
    ([{"role": "user", "content": "<ImageHere> hi"}], 400, "<ImageHere>"),
    ([{"role": "user", "content": [{"type": "audio", "data": "x"}]}], 422, "messages.0.content"),
    ([{"role": "tool", "content": "x"}], 422, "messages.0.role"),
    (_image_url(_data_uri(_noise(200))), 413, "above the limit"),
])
def test_bad_requests_get_a_4xx_with_a_clear_message(client, messages, status, message):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=N)
    assert caught.value.status_code == status and message in caught.value.message


def test_malformed_json_and_missing_fields(base_url):
    bad = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"messages": [',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 422 and "messages" in missing.json()["error"]["message"]
    too_long = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                    "max_tokens": 10**6})
    assert too_long.status_code == 400 and "limit" in too_long.json()["error"]["message"]


def test_local_files_only_when_allowed(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    path = tmp_path / "red.png"
    _image("red").save(path)
    [expected] = _engine(model_and_tokenizer, [("what colour", [Image.open(path)])],
                         GenerationSettings(max_new_tokens=N))
    with _serving(build_app(model, tokenizer, "tiny", allow_local_files=True)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for ref in (str(path), path.as_uri()):
            content = [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": "what colour"}]
            out = client.chat.completions.create(model="tiny", max_tokens=N,
                                                 messages=[{"role": "user", "content": content}])
            assert out.choices[0].message.content == expected
