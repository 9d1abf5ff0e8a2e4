"""`serve --frontend-processes N`: the HTTP front ends in other processes, linked to the model's scheduler.

The link is tested over a real `multiprocessing` pipe between threads of this process (fast), and with two front
ends spawned as processes sharing a port, as `serve` runs them.
"""

import asyncio
import multiprocessing
import os
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.engine_link import EngineBridge, RemoteBackend
from minigpt4qwen.inference.frontends.openai_api.frontend_process import FrontendOptions, FrontendProcesses
from minigpt4qwen.inference.frontends.openai_api.local_backend import LocalBackend
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import PromptSpec
from minigpt4qwen.inference.frontends.openai_api.server import build_app, create_app
from tests.conftest import make_tiny_chat_model
from tests.test_server import _image, _noise, _serving, _user

N = 16
PROMPTS = [(text, colour) for text in ("what colour", "what is the shape") for colour in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)


@pytest.fixture(scope="module")
def alone(model_and_tokenizer):
    """Each prompt's greedy answer from the server with the model in its own process."""
    with _serving(build_app(*model_and_tokenizer, "tiny", slots=4, slot_tokens=256)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        answers = [client.chat.completions.create(model="tiny", messages=[_user(text, _image(colour))],
                                                  max_tokens=N).choices[0].message.content
                   for text, colour in PROMPTS]
    assert len(set(answers)) >= 3  # a mix-up would show
    return answers


@contextmanager
def _linked(model_and_tokenizer, **app_options):
    """The app over a `RemoteBackend` whose engine (`EngineBridge` + scheduler) runs in a thread of this process;
    yields (base URL, scheduler, front-end backend)."""
    model, tokenizer = model_and_tokenizer
    scheduler = GenerationScheduler(model, tokenizer, slots=4, capacity=256)
    engine_end, front_end = multiprocessing.Pipe()
    bridge = threading.Thread(target=EngineBridge(engine_end, LocalBackend(model, tokenizer, scheduler)).run)
    bridge.start()
    backend = RemoteBackend(front_end, tokenizer, PromptSpec.of(model), scheduler.capacity)
    try:
        with _serving(create_app(backend, tokenizer, "tiny", **app_options)) as url:
            yield url, scheduler, backend
    finally:
        front_end.close()  # the engine sees the front end hang up
        bridge.join(10)
        scheduler.close()
    assert not bridge.is_alive()


def _wait_until_up(url, timeout=120):
    """Waits until the spawned front ends answer /health (they import the package first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"{url}/health")
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _ask_all(url, stream_every=2):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

        async def one(i):
            text, colour = PROMPTS[i % len(PROMPTS)]
            out = await client.chat.completions.create(model="tiny", messages=[_user(text, _image(colour))],
                                                       max_tokens=N, stream=i % stream_every == 1)
            if i % stream_every == 1:
                return "".join([c.choices[0].delta.content or "" async for c in out])
            return out.choices[0].message.content

        answers = await asyncio.gather(*(one(i) for i in range(3 * len(PROMPTS))))
        await client.close()
        return answers

    return asyncio.run(run())


def test_linked_front_end_gives_each_request_its_own_answer(model_and_tokenizer, alone):
    with _linked(model_and_tokenizer) as (url, scheduler, _):
        answers = _ask_all(url)  # 18 concurrent requests on 4 slots, half of them streamed
        assert answers == [alone[i % len(PROMPTS)] for i in range(len(answers))]
        health = httpx.get(f"{url}/health").json()
        assert health["slots"] == 4 and health["status"] == "ok"  # the engine's stats, up to 0.5 s old
        assert scheduler.stats()["completed"] >= len(answers)


def test_linked_front_end_beam_search_errors_and_cancel(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with _linked(model_and_tokenizer, max_window_size=60) as (url, scheduler, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        # beam search runs in the model's process on the images sent there resized: the same answer as in-process
        messages = [_user("what colour", _noise(300))]
        beam = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                              extra_body={"num_beams": 2})
        with _serving(build_app(model, tokenizer, "tiny", slots=2, slot_tokens=256, max_window_size=60)) as local:
            expected = openai.OpenAI(base_url=f"{local}/v1", api_key="x", max_retries=0).chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, extra_body={"num_beams": 2})
        assert beam.choices[0].message.content == expected.choices[0].message.content
        assert beam.usage.prompt_tokens == expected.usage.prompt_tokens > model.num_query_tokens

        # a request the scheduler refuses is refused by the front end, with the scheduler's reason
        with pytest.raises(openai.BadRequestError, match="does not fit a slot"):
            client.chat.completions.create(model="tiny", messages=[_user("what " * 400)], max_tokens=8)

        # a client that leaves a stream frees its slot in the engine
        with client.chat.completions.create(model="tiny", messages=[_user("what colour", _image("blue"))],
                                            max_tokens=200, stream=True) as stream:
            next(iter(stream))
        deadline = time.monotonic() + 10
        while scheduler.stats()["active_slots"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.stats()["active_slots"] == 0


def test_engine_gone_fails_requests_in_flight_and_stops_the_front_end(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine_end, front_end = multiprocessing.Pipe()
    engine_end.send(("stats", {"slots": 2}))  # the engine is up
    backend = RemoteBackend(front_end, tokenizer, PromptSpec.of(model), capacity=256)
    lost = threading.Event()
    backend.on_lost = lost.set
    handle = backend.submit(*_prompt(model, tokenizer), GenerationSettings(max_new_tokens=8))
    assert engine_end.recv()[0] == "submit"
    engine_end.close()  # the engine's process dies with the request in flight
    assert lost.wait(10) and handle.wait(10)
    assert handle.finish_reason == "error" and "engine process has gone" in str(handle.error)
    with pytest.raises(RuntimeError, match="engine process has gone"):
        backend.submit(*_prompt(model, tokenizer), GenerationSettings(max_new_tokens=8))


def _prompt(model, tokenizer):
    from minigpt4qwen.inference.engine import IMAGE_PROMPT
    from minigpt4qwen.inference.frontends.openai_api.openai_protocol import Conversation

    return Conversation(query=IMAGE_PROMPT + "what", query_images=[_image("red")]).prompt(PromptSpec.of(model),
                                                                                          tokenizer)


def test_two_spawned_front_ends_share_a_port_and_stop(model_and_tokenizer, alone):
    model, tokenizer = model_and_tokenizer
    scheduler = GenerationScheduler(model, tokenizer, slots=4, capacity=256)
    frontends = FrontendProcesses(model, tokenizer, scheduler, FrontendOptions(
        port=0, model_name="tiny", app_options={"max_queue": 3}, log_level="warning"), count=2)
    frontends.start()
    port = frontends.port
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=frontends.run()))
    runner.start()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url)
        assert all(process.is_alive() and process.pid != os.getpid() for process in frontends.processes)

        async def held_burst():  # the model is held: 3 are admitted (by either process) and wait, 5 get 429
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

            async def one(i):
                text, colour = PROMPTS[i % len(PROMPTS)]
                try:
                    out = await client.chat.completions.create(model="tiny", messages=[_user(text, _image(colour))],
                                                               max_tokens=N)
                except openai.RateLimitError:
                    return 429
                assert out.choices[0].message.content == alone[i % len(PROMPTS)]
                return 200

            tasks = [asyncio.ensure_future(one(i)) for i in range(8)]
            while sum(t.done() for t in tasks) < 5:
                await asyncio.sleep(0.05)
            scheduler.model_lock.__exit__(None, None, None)
            statuses = await asyncio.gather(*tasks)
            await client.close()
            return sorted(statuses)

        scheduler.model_lock.__enter__()
        assert asyncio.run(held_burst()) == [200] * 3 + [429] * 5  # one limit across the front ends
    finally:
        frontends.stop()
        runner.join(60)
        scheduler.close()
    assert result == {"code": 0}


def test_front_ends_report_a_taken_port_before_starting(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="at least one"):
        FrontendProcesses(model, tokenizer, None, FrontendOptions(), count=0)
    with socket.socket() as taken:  # another program listens there
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        frontends = FrontendProcesses(model, tokenizer, None, FrontendOptions(port=port))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            frontends.start()
    assert frontends.processes == []


def test_a_front_end_that_dies_stops_the_others(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scheduler = GenerationScheduler(model, tokenizer, slots=2, capacity=128)
    frontends = FrontendProcesses(model, tokenizer, scheduler, FrontendOptions(port=0, log_level="warning"), count=2)
    frontends.start()
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=frontends.run()))
    runner.start()
    try:
        _wait_until_up(f"http://127.0.0.1:{frontends.port}")
        frontends.processes[1].kill()  # e.g. the out-of-memory killer
        runner.join(60)
        assert not runner.is_alive() and not frontends.processes[0].is_alive()
    finally:
        frontends.stop()
        runner.join(60)
        scheduler.close()
    assert result == {"code": -9}


def test_resized_images_give_the_same_pixels():
    from minigpt4qwen.data.images import ImageTransform
    from minigpt4qwen.inference.frontends.openai_api.openai_protocol import Conversation

    image = _noise(300).crop((0, 0, 300, 170))
    conversation = Conversation(query="q", query_images=[image], turns=[("a", "b")], turn_images=[[_noise(90)]])
    small = conversation.resized(224)
    transform = ImageTransform(224, train=False)
    assert [i.size for i in small.query_images + small.turn_images[0]] == [(224, 224)] * 2
    assert torch.equal(transform(small.query_images[0]), transform(image))
    assert torch.equal(transform(small.turn_images[0][0]), transform(conversation.turn_images[0][0]))


def test_health_says_when_the_engine_stops_answering(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine_end, front_end = multiprocessing.Pipe()
    engine_end.send(("stats", {"slots": 2, "active_slots": 0, "queued": 0}))
    backend = RemoteBackend(front_end, tokenizer, PromptSpec.of(model), capacity=256)
    with _serving(create_app(backend, tokenizer, "tiny")) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        backend._stats_time -= 10  # no stats for 10 s
        response = httpx.get(f"{url}/health")
        assert response.status_code == 503 and response.json()["status"] == "engine not responding"
    engine_end.close()


def test_hang_up_ends_a_blocked_recv_and_tells_the_peer():
    from minigpt4qwen.inference.frontends.openai_api.engine_link import hang_up

    ours, theirs = multiprocessing.Pipe()
    ended = []

    def read():
        try:
            ours.recv()
        except EOFError:
            ended.append("eof")

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    hang_up(ours)
    reader.join(5)
    assert ended == ["eof"]
    with pytest.raises(EOFError):
        theirs.recv()
