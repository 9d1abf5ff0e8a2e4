"""The chat engine: images encoded once, history kept and truncated, streaming, one-call `chat`."""

import threading

import pytest
from PIL import Image
from transformers import TextIteratorStreamer

from minigpt4qwen.data.images import ImageLoadError
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings, chat
from tests.conftest import make_tiny_chat_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=0)


def _image(color):
    return Image.new("RGB", (40, 40), color)


def test_images_are_encoded_once_per_image(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px: calls.append(px.shape[0]) or original(px))
    session.add_image(_image("red"))
    session.ask("what colour is the shape", GenerationSettings(max_new_tokens=3))
    session.ask("what is the shape", GenerationSettings(max_new_tokens=3))
    assert calls == [1]
    ids, features = session.build_prompt("what")
    assert features.shape[0] == 1 and int((ids == model.image_token_id).sum()) == model.num_query_tokens


def test_history_is_truncated_to_the_window_with_its_images(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, max_window_size=40)
    session.add_image(_image("red"))
    session.ask("what colour is the shape", GenerationSettings(max_new_tokens=2))
    session.ask("what colour is the shape", GenerationSettings(max_new_tokens=2))
    ids, features = session.build_prompt("what is the shape")
    assert ids.shape[1] <= 40 and features is None  # the first turn (and its image) no longer fits


def test_clear_history_keeps_images_and_clear_forgets_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    session.add_image(_image("blue"))
    session.ask("what colour", GenerationSettings(max_new_tokens=2))
    session.clear_history()
    assert session.turns == [] and len(session.pending_images) == 1
    session.clear()
    assert session.pending_images == []


def test_streaming_delivers_the_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    session.add_image(_image("green"))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    result = {}
    settings = GenerationSettings(max_new_tokens=5)
    worker = threading.Thread(target=lambda: result.update(reply=session.ask("what", settings, streamer)))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed.strip() == result["reply"]


def test_one_call_chat_and_bad_image(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    reply, history = chat(model, tokenizer, "what colour", images=[_image("red")],
                          settings=GenerationSettings(max_new_tokens=3, do_sample=True, seed=1, top_p=0.9))
    assert history[-1][1] == reply and "<ImageHere>" in history[-1][0]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    session = ChatSession(model, tokenizer)
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        session.add_image(bad)
    assert session.pending_images == []


def test_one_call_chat_continues_its_own_history(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    images = [_image("red")]
    first, history = chat(model, tokenizer, "what colour", images=images, settings=GenerationSettings(max_new_tokens=3))
    second, history = chat(model, tokenizer, "what shape", history=history, images=images + [_image("blue")],
                           settings=GenerationSettings(max_new_tokens=3))
    assert len(history) == 2 and history[0][1] == first and history[1][1] == second
    assert history[1][0].count("<ImageHere>") == 1  # the new image belongs to the new question
    with pytest.raises(ValueError, match="history refers to 1 images"):
        chat(model, tokenizer, "again", history=history[:1], images=[])
