"""The OpenAI-compatible server, run for real by uvicorn and driven with the official `openai` client."""

import asyncio
import base64
import gc
import io
import os
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

from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle
from minigpt4qwen.inference.engine import IMAGE_PROMPT, ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import ChatRequest, Conversation, PromptSpec
from minigpt4qwen.inference.frontends.openai_api.server import build_app
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
def app(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return build_app(model, tokenizer, "tiny", max_body_bytes=100_000, max_images=3, slots=8, slot_tokens=256)


@pytest.fixture(scope="module")
def base_url(app):
    with _serving(app) as url:
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
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["slots"] == 8 and health["active_slots"] == health["queued"] == 0
    client.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=N)
    after = httpx.get(f"{base_url}/health").json()
    assert after["tokens_per_s"] > 0
    assert after["round_s"] > health["round_s"] and 0 <= after["device_wait_s"] <= after["round_s"]
    assert health["first_token_ms_p50"] is None and 0 <= after["slot_wait_ms_p50"] <= after["first_token_ms_p50"]


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
    assert all(c.usage is None and "usage" in c.model_fields_set for c in chunks[:-1])  # present, null (OpenAI's)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_concurrent_clients_get_their_own_answers_decoded_together(app, client, model_and_tokenizer, monkeypatch):
    scheduler = app.state.scheduler
    images = {"red": _image("red"), "blue": _image((0, 0, 255)), "white": _image("white")}
    expected = {k: _engine(model_and_tokenizer, [("what colour", [im])], GenerationSettings(max_new_tokens=N))[0]
                for k, im in images.items()}
    assert len(set(expected.values())) == len(images), "the tiny model must tell these images apart"
    rows, decode = [], scheduler.decoder.launch_decode
    monkeypatch.setattr(scheduler.decoder, "launch_decode",
                        lambda steps, n, *args, **kw: rows.append(n) or decode(steps, n, *args, **kw))
    answers = {}

    def ask(key, stream):
        out = client.chat.completions.create(model="tiny", messages=[_user("what colour", images[key])], max_tokens=N,
                                             stream=stream)
        answers[key] = ("".join(c.choices[0].delta.content or "" for c in out) if stream
                        else out.choices[0].message.content)

    with scheduler.model_lock:  # held until all three are queued: they are then decoded in one batch
        threads = [threading.Thread(target=ask, args=(key, i % 2 == 0)) for i, key in enumerate(images)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.stats()["queued"] < len(images) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert answers == expected and max(rows) == len(images)


def test_a_dropped_stream_stops_its_generation(app, base_url, monkeypatch):
    scheduler = app.state.scheduler
    steps, decode = [0], scheduler.decoder.launch_decode

    def slow_decode(n, *args, **kwargs):
        steps[0] += n
        time.sleep(0.01)
        return decode(n, *args, **kwargs)

    monkeypatch.setattr(scheduler.decoder, "launch_decode", slow_decode)
    request = {"messages": [_user("what", _image("red"))], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=request) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: hang up
    deadline = time.monotonic() + 5
    while httpx.get(f"{base_url}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    health = httpx.get(f"{base_url}/health").json()
    assert health["active_slots"] == 0 and steps[0] < 100  # 200 without the hang-up
    assert health["admitted"] == 0  # the dropped stream left the queue


def test_a_client_that_leaves_before_its_whole_reply_frees_the_slot(app, base_url, monkeypatch):
    scheduler = app.state.scheduler
    steps, decode = [0], scheduler.decoder.launch_decode

    def slow_decode(n, *args, **kwargs):  # 10 ms a step: the 200 steps take 2 s, and the client leaves at 0.5
        steps[0] += n
        time.sleep(0.01 * n)
        return decode(n, *args, **kwargs)

    monkeypatch.setattr(scheduler.decoder, "launch_decode", slow_decode)
    request = {"messages": [_user("what", _image("red"))], "max_tokens": 200}  # not streamed: one answer at the end
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base_url}/v1/chat/completions", json=request, timeout=0.5)  # as a client's timeout does
    deadline = time.monotonic() + 5
    while httpx.get(f"{base_url}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    health = httpx.get(f"{base_url}/health").json()
    assert health["active_slots"] == 0 and steps[0] < 150  # 200 if it decoded on for nobody
    assert health["admitted"] == 0


def test_nulls_negative_seeds_and_the_limit_s_name_are_openai_s(base_url):
    def post(**fields):
        return httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields})

    # SDKs that send every optional field send the unused ones as null: the defaults.
    nulls = post(stream=None, n=None, stream_options={"include_usage": None}, seed=None, temperature=None)
    assert nulls.status_code == 200 and nulls.json()["object"] == "chat.completion"
    sampled = {"temperature": 1.5}
    negative = post(seed=-1, **sampled)  # OpenAI takes any signed 64-bit seed: ours are taken modulo 2**63
    assert negative.status_code == 200
    assert negative.json()["choices"] == post(seed=2**63 - 1, **sampled).json()["choices"]
    assert post(seed=2**63).status_code == 400
    over = post(max_completion_tokens=10**6)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"


def test_a_closed_scheduler_answers_503_and_a_bug_500_in_openai_s_error_body(model_and_tokenizer, monkeypatch):
    app = build_app(*model_and_tokenizer, "tiny", slots=2, slot_tokens=256)
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with _serving(app) as url:
        app.state.scheduler.close()  # e.g. shutting down
        closed = httpx.post(f"{url}/v1/chat/completions", json=request)
        assert closed.status_code == 503 and "not serving" in closed.json()["error"]["message"]
        monkeypatch.setattr(ChatRequest, "settings", lambda *_: 1 / 0)  # a bug anywhere in the handler
        bug = httpx.post(f"{url}/v1/chat/completions", json=request)
        assert bug.status_code == 500 and bug.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/health").json()["admitted"] == 0


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


def test_the_api_key_is_required_under_a_root_path_too():
    import asyncio

    from minigpt4qwen.inference.frontends.openai_api.admission import ApiKeyGuard

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        raise AssertionError("the body of a refused request is not read")

    guard = ApiKeyGuard(app, "s3cret")
    for root in ("", "/api"):  # behind uvicorn --root-path /api (or a Mount) ASGI's path includes the root
        scope = {"type": "http", "path": f"{root}/v1/models", "root_path": root, "headers": []}
        asyncio.run(guard(scope, receive, send))
        assert sent[-2]["status"] == 401 and not reached
    scope["headers"] = [(b"authorization", b"Bearer s3cret")]
    asyncio.run(guard(scope, receive, send))
    asyncio.run(guard({**scope, "path": "/api/health", "headers": []}, receive, send))
    assert reached == ["/api/v1/models", "/api/health"]


def test_a_full_queue_gets_429_and_frees_up(model_and_tokenizer):
    app = build_app(*model_and_tokenizer, "tiny", max_queue=1, slots=2, slot_tokens=128)
    with _serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with app.state.scheduler.model_lock:  # the first request waits in the queue
            first = threading.Thread(target=lambda: client.chat.completions.create(
                model="tiny", messages=[_user("what")], max_tokens=2))
            first.start()
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health").json()["admitted"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="busy") as refused:
                client.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=2)
            assert refused.value.response.headers["retry-after"] == "1"
        first.join(30)
        assert client.chat.completions.create(model="tiny", messages=[_user("what")], max_tokens=2).choices


def test_stop_strings_seed_and_length(app, client, model_and_tokenizer):
    green = _image("green")
    [full] = _engine(model_and_tokenizer, [("what", [green])], GenerationSettings(max_new_tokens=N))
    stop = full.split()[2]
    [cut] = _engine(model_and_tokenizer, [("what", [green])], GenerationSettings(max_new_tokens=N, stop=(stop,)))
    out = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N, stop=[stop])
    assert out.choices[0].message.content == cut and stop not in cut and out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut

    # a seeded sample: the scheduler's answer for this prompt alone, every time, whatever runs beside it
    sampled = GenerationSettings(max_new_tokens=N, do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    model, tokenizer = model_and_tokenizer
    prompt = Conversation(query=IMAGE_PROMPT + "what", query_images=[green]).prompt(PromptSpec.of(model), tokenizer)
    expected = app.state.scheduler.submit(*prompt[:1], pixel_values=prompt[1], settings=sampled).result(30)
    for stream in (False, True):
        out = client.chat.completions.create(model="tiny", messages=[_user("what", green)], max_tokens=N,
                                             temperature=1.5, top_p=0.9, seed=5, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
        assert text == expected
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
    ([{"role": "user", "content": [{"type": "audio", "data": "x"}]}], 400, "messages.0.content"),
    ([{"role": "tool", "content": "x"}], 400, "messages.0.role"),
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
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
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


def test_beam_search_runs_alone_between_steps(client, model_and_tokenizer):
    red = _image("red")
    [expected] = _engine(model_and_tokenizer, [("what colour", [red])], GenerationSettings(max_new_tokens=8,
                                                                                         num_beams=2))
    out = client.chat.completions.create(model="tiny", messages=[_user("what colour", red)], max_tokens=8,
                                         extra_body={"num_beams": 2})
    assert out.choices[0].message.content == expected and out.usage.prompt_tokens > 4


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_64_concurrent_clients_lose_no_request_and_memory_stays_flat(model_and_tokenizer):
    prompts = [(text, _image(colour)) for text in ("what colour", "what is the shape")
               for colour in ("red", "blue", "green", "white")]
    app = build_app(*model_and_tokenizer, "tiny", max_queue=48, slots=16, slot_tokens=128)
    scheduler = app.state.scheduler
    with _serving(app) as url:
        alone = [openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=[_user(text, image)], max_tokens=12).choices[0].message.content
            for text, image in prompts]
        assert len(set(alone)) >= 4  # a mix-up would show

        async def burst(held: bool) -> list[int]:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

            async def one(i: int) -> int:
                text, image = prompts[i % len(prompts)]
                try:
                    out = await client.chat.completions.create(model="tiny", messages=[_user(text, image)],
                                                               max_tokens=12, stream=i % 2 == 1)
                    answer = ("".join([c.choices[0].delta.content or "" async for c in out]) if i % 2
                              else out.choices[0].message.content)
                except openai.RateLimitError:
                    return 429
                assert answer == alone[i % len(prompts)]  # its own answer: nobody else's text
                return 200

            tasks = [asyncio.ensure_future(one(i)) for i in range(64)]
            if held:  # the model is held: 48 are admitted and wait, 16 are refused; then let go
                while sum(t.done() for t in tasks) < 16 or scheduler.stats()["queued"] < 48:
                    await asyncio.sleep(0.01)
                scheduler.model_lock.__exit__(None, None, None)
            statuses = await asyncio.gather(*tasks)
            await client.close()
            return statuses

        scheduler.model_lock.__enter__()
        assert sorted(asyncio.run(burst(held=True))) == [200] * 48 + [429] * 16
        sizes = []
        for _ in range(4):  # bounded: every request admitted or refused, none lost
            statuses = asyncio.run(burst(held=False))
            assert len(statuses) == 64 and set(statuses) <= {200, 429} and statuses.count(200) >= 48
            gc.collect()
            sizes.append(_rss())
        health = httpx.get(f"{url}/health").json()
        assert health["admitted"] == health["active_slots"] == health["queued"] == 0
        assert sizes[-1] - sizes[1] < 8 * 2**20, sizes  # no growth after warming up (measured: < 1 MiB)
        assert not [o for o in gc.get_objects() if type(o) is GenerationHandle]  # no request is kept
