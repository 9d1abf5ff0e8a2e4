"""The web UI's tabs without a browser: several tabs decode together through one `GenerationScheduler`, each
getting the answers it gets alone; beam search runs beside them; images uploaded during a reply wait for the next
question; Regenerate replaces the last answer."""

import threading
import time

import pytest
from PIL import Image

from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.chat_tab import ChatTab
from tests.conftest import make_tiny_chat_model

N = 24
GREEDY = GenerationSettings(max_new_tokens=N)
SAMPLED = GenerationSettings(max_new_tokens=N, do_sample=True, temperature=1.5, seed=3)
ACTIVE = []  # the scheduler's busy slots at each forward pass of the LLM


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)


@pytest.fixture(scope="module")
def scheduler(model_and_tokenizer):
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=4, capacity=256, check_every=4)

    def count(module, args):  # runs in the scheduler's thread (or beam search's): ~3 ms a step, so replies overlap
        ACTIVE.append(scheduler.stats()["active_slots"])
        time.sleep(0.003)

    hook = model_and_tokenizer[0].language_model.get_decoder().register_forward_pre_hook(count)
    yield scheduler
    hook.remove()
    scheduler.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for colour in ("red", "blue"):
        paths[colour] = str(folder / f"{colour}.png")
        Image.new("RGB", (40, 40), colour).save(paths[colour])
    return paths


def _tab(model_and_tokenizer, scheduler, *images):
    tab = ChatTab(ChatSession(*model_and_tokenizer), scheduler)
    for path in images:
        tab.add_image(path)
    return tab


def _conversation(tab, questions):
    """Asks each (question, settings) in turn; returns the replies on screen."""
    for question, settings in questions:
        *_, chat = tab.ask(question, settings)
    return [message["content"] for message in chat if message["role"] == "assistant"]


def test_two_tabs_decode_together_and_get_their_answers_alone(model_and_tokenizer, scheduler, images):
    a = (images["red"],), [("what colour", GREEDY), ("what shape", SAMPLED)]
    b = (images["blue"],), [("what is it", SAMPLED), ("what colour", GREEDY)]
    alone, steps_alone = [], 0
    for pictures, questions in (a, b):
        tab = _tab(model_and_tokenizer, scheduler, *pictures)
        ACTIVE.clear()
        alone.append((_conversation(tab, questions), tab.session.turns))
        steps_alone += len(ACTIVE)
        assert max(ACTIVE) == 1
    assert len({reply for replies, _ in alone for reply in replies}) == 4 and all(len(r) > 10 for r in alone[0][0])

    tabs = [_tab(model_and_tokenizer, scheduler, *pictures) for pictures, _ in (a, b)]
    together, start = [None, None], threading.Barrier(2)

    def talk(i, questions):
        start.wait()
        together[i] = (_conversation(tabs[i], questions), tabs[i].session.turns)

    ACTIVE.clear()
    threads = [threading.Thread(target=talk, args=(i, questions)) for i, (_, questions) in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == alone
    assert max(ACTIVE) == 2 and len(ACTIVE) < steps_alone  # forward passes shared by the two tabs


def test_beam_search_runs_beside_batched_replies(model_and_tokenizer, scheduler, images):
    beams = GenerationSettings(max_new_tokens=N, num_beams=3)
    long = GenerationSettings(max_new_tokens=150)
    session = ChatSession(*model_and_tokenizer)
    session.add_image(images["red"])
    expected_beams = session.ask("what colour", beams)  # transformers' beam search on the idle model
    expected_greedy = _conversation(_tab(model_and_tokenizer, scheduler, images["blue"]), [("what shape", long)])

    greedy_tab = _tab(model_and_tokenizer, scheduler, images["blue"])
    streaming = greedy_tab.ask("what shape", long)
    next(streaming), next(streaming)  # the question, then the reply's first piece: it is decoding now
    assert _conversation(_tab(model_and_tokenizer, scheduler, images["red"]), [("what colour", beams)]) == [
        expected_beams]
    assert scheduler.stats()["active_slots"] == 1  # the greedy reply was paused, not finished, meanwhile
    *_, chat = streaming
    assert [chat[-1]["content"]] == expected_greedy


def test_image_added_during_a_reply_waits_and_regenerate_replaces_the_last_answer(model_and_tokenizer, scheduler,
                                                                                  images):
    tab = _tab(model_and_tokenizer, scheduler, images["red"])
    streaming = tab.ask("what colour", GREEDY)
    next(streaming), next(streaming)
    tab.add_image(images["blue"])  # shown below the reply being written, for the next question
    *_, chat = streaming
    session = tab.session
    assert [m["role"] for m in chat] == ["user", "user", "assistant", "user"]
    assert len(session.turns) == 1 and session.turns[0][0].count("<ImageHere>") == 1
    assert [len(images) for images in session.turn_images] == [1] and len(session.pending_images) == 1

    first = session.turns[0][1]
    again = GenerationSettings(max_new_tokens=N, do_sample=True, temperature=1.5, seed=4)
    *_, chat = tab.regenerate(again)
    reference = _tab(model_and_tokenizer, scheduler, images["red"])
    assert chat[2]["content"] == _conversation(reference, [("what colour", again)])[0] != first
    assert session.turns == reference.session.turns and len(session.pending_images) == 1  # blue: still pending
    assert [m["role"] for m in chat] == ["user", "user", "assistant", "user"]


def test_a_long_chat_leaves_each_reply_its_room_and_a_full_slot_is_said(model_and_tokenizer, scheduler,
                                                                        monkeypatch):
    from minigpt4qwen.inference.frontends.chat_tab import SLOT_FULL

    prompts, submit = [], scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda ids, **kw: prompts.append(ids.shape[1]) or submit(ids, **kw))
    tab = _tab(model_and_tokenizer, scheduler)
    question = "what colour is the shape and where is it " * 4
    replies = _conversation(tab, [(question, GenerationSettings(max_new_tokens=40))] * 4)
    # Older turns went so that every prompt left its reply 40 tokens of the 256-token slot.
    assert len(tab.session.turns) == 4 and all(n <= scheduler.capacity - 40 for n in prompts)
    assert max(prompts) > scheduler.capacity // 2 and not any(SLOT_FULL in reply for reply in replies)
    # A reply asking for more than the slot holds keeps half of it, and is marked when the slot cuts it.
    [*_, last] = _conversation(tab, [(question, GenerationSettings(max_new_tokens=1000))])
    assert prompts[-1] <= scheduler.capacity // 2 and last.endswith(SLOT_FULL)
    assert SLOT_FULL not in tab.session.turns[-1][1]  # on screen only
