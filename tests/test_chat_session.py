"""ChatSession additions: cancellation, regenerate, add_turn, stop strings, beam search with a streamer, and the
safe text parsing of GenerationSettings."""

import threading
import time

import pytest
import torch
from PIL import Image
from transformers import StoppingCriteria, TextIteratorStreamer

from minigpt4qwen.inference.engine import ChatSession, GenerationCancelled, GenerationSettings
from tests.conftest import make_tiny_chat_model

SHORT = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=1)


def _stream(session, call):
    """Runs `call(streamer)` in a thread; returns (streamed text, result or exception)."""
    streamer = TextIteratorStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome = {}

    def work():
        try:
            outcome["result"] = call(streamer)
        except Exception as err:
            outcome["result"] = err

    worker = threading.Thread(target=work)
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=60)
    return text, outcome["result"]


def test_cancel_stops_generation_and_keeps_the_session(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    session.add_image(Image.new("RGB", (40, 40), "red"))
    steps = []

    class CancelAfterThree(StoppingCriteria):  # cancels from inside the loop, as another thread would
        def __call__(self, input_ids, scores, **kwargs):
            steps.append(1)
            if len(steps) == 3:
                session.cancel()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, stopping_criteria, **k: original(
        *a, stopping_criteria=[CancelAfterThree(), *stopping_criteria], **k))
    settings = GenerationSettings(max_new_tokens=500, stop=("@@@",))  # "@@@" never appears: only cancel stops it
    with pytest.raises(GenerationCancelled) as cancelled:
        session.ask("what", settings)
    assert len(steps) == 3 and isinstance(cancelled.value.partial, str)  # stopped in the step it was raised
    assert session.turns == [] and len(session.pending_images) == 1
    monkeypatch.undo()
    reply = session.ask("what", SHORT)  # the image kept pending goes with the next question
    assert session.turns == [("<Img><ImageHere></Img>what", reply)] and session.pending_images == []


def test_a_cancel_while_the_prompt_is_built_stops_the_request(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    build, started = session.build_prompt, threading.Event()

    def slow_build(query):  # images being encoded, for seconds on a CPU: Ctrl-C comes meanwhile
        started.set()
        time.sleep(0.3)
        return build(query)

    monkeypatch.setattr(session, "build_prompt", slow_build)
    canceller = threading.Thread(target=lambda: started.wait(10) and session.cancel())
    canceller.start()
    with pytest.raises(GenerationCancelled):
        session.ask("what", SHORT)
    canceller.join()
    assert session.turns == []  # the reply nobody saw is not history
    monkeypatch.undo()
    assert session.ask("what", SHORT) is not None and len(session.turns) == 1  # a cancel stops one request only


def test_an_image_marker_in_a_reply_is_text_in_the_next_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    session.record_turn("what", "it says <Img><ImageHere></Img> here")  # what the model may write
    ids, features = session.build_prompt("and now?")  # no image expected for it, and no refusal either
    assert features is None and model.image_token_id not in ids[0].tolist()
    assert session.turns[0][1] == "it says <Img><ImageHere></Img> here"  # the history shows the reply as written
    assert session.ask("and now?", SHORT) is not None


def test_regenerate_replaces_the_last_reply_and_keeps_new_images(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    session.add_image(Image.new("RGB", (40, 40), "blue"))
    first = session.ask("what colour", SHORT)
    session.add_image(Image.new("RGB", (40, 40), "green"))  # for the next question, not the regenerated one
    again = session.regenerate(SHORT)
    assert again == first and len(session.turns) == 1 and len(session.turn_images[0]) == 1
    assert len(session.pending_images) == 1
    sampled = session.regenerate(GenerationSettings(max_new_tokens=6, do_sample=True, temperature=2.0, seed=3))
    assert session.turns[-1][1] == sampled
    with pytest.raises(ValueError, match="nothing to regenerate"):
        ChatSession(model, tokenizer).regenerate()
    with pytest.raises(ValueError, match="temperature"):
        session.regenerate(GenerationSettings(temperature=0.0))
    assert session.turns[-1][1] == sampled  # a failed regenerate keeps the previous reply


def test_add_turn_rebuilds_a_conversation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    live = ChatSession(model, tokenizer)
    live.add_image(Image.new("RGB", (40, 40), "red"))
    reply = live.ask("what colour", SHORT)
    rebuilt = ChatSession(model, tokenizer)
    rebuilt.add_turn("what colour", reply, images=[Image.new("RGB", (40, 40), "red")])
    assert rebuilt.turns == live.turns
    ids, features = rebuilt.build_prompt("what shape")
    live_ids, live_features = live.build_prompt("what shape")
    assert torch.equal(ids, live_ids) and torch.allclose(features, live_features)
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        rebuilt.add_turn("<ImageHere><ImageHere>", "x", images=[Image.new("RGB", (40, 40), "red")])


def test_stop_strings_cut_the_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    full = ChatSession(model, tokenizer).ask("what", GenerationSettings(max_new_tokens=12))
    stop = full[4:6]
    cut = ChatSession(model, tokenizer).ask("what", GenerationSettings(max_new_tokens=12, stop=(stop,)))
    assert len(full) > 6 and cut == full[:full.find(stop)].strip()


def test_beam_search_feeds_the_streamer_at_the_end(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    beams = GenerationSettings(max_new_tokens=6, num_beams=2)
    streamed, reply = _stream(session, lambda s: session.ask("what", beams, s))
    assert isinstance(reply, str) and streamed.strip() == reply


def test_streamer_is_ended_when_generation_fails(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer)
    streamed, error = _stream(session, lambda s: session.ask("<ImageHere> what", SHORT, s))  # no image added
    assert streamed == "" and isinstance(error, ValueError) and "image markers" in str(error)


def test_settings_text_parsing_is_typed_and_never_evaluated():
    settings = GenerationSettings()
    assert settings.with_text("temperature", "0.7").temperature == 0.7
    assert settings.with_text("do_sample", "on").do_sample is True
    assert settings.with_text("seed", "none").seed is None and settings.with_text("seed", "12").seed == 12
    assert settings.with_text("stop", '["a", "b c"]').stop == ("a", "b c")
    assert settings.with_text("stop", "User:").stop == ("User:",) and settings.with_text("stop", "").stop == ()
    assert settings.with_text("temperature", "1").temperature == 1.0
    for key, text, message in [("temperature", "__import__('os')", "must be a number"),
                               ("temperature", "nan", "must be a number"), ("top_p", "1.5", r"top_p must be in"),
                               ("max_new_tokens", "0", ">= 1"), ("max_new_tokens", "True", "an integer"),
                               ("do_sample", "maybe", "true or false"), ("stop", '[1, 2]', "list of strings"),
                               ("bogus", "1", "unknown setting"), ("seed", "-1", "seed must be")]:
        with pytest.raises(ValueError, match=message):
            settings.with_text(key, text)
    assert settings == GenerationSettings()  # unchanged by the failed updates
    with pytest.raises(ValueError, match="do_sample must be true or false"):
        GenerationSettings(do_sample="yes").check()
    assert GenerationSettings(temperature=0.5, do_sample=True).generate_kwargs()["temperature"] == 0.5
    assert "stop" not in GenerationSettings(stop=("x",)).generate_kwargs()


def test_whole_number_float_settings_reach_transformers_as_floats(model_and_tokenizer):
    session = ChatSession(*model_and_tokenizer)  # no decoder: transformers' generate, which refuses ints here
    for settings in (GenerationSettings(max_new_tokens=3, do_sample=True, temperature=2, seed=0),
                     GenerationSettings(max_new_tokens=3, repetition_penalty=2, num_beams=2)):
        assert isinstance(session.ask("what", settings), str)
