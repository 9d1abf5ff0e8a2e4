"""ChatSession with a GraphDecoder: the same greedy replies, stop strings, streaming and cancellation as
the `generate` path, seeded sampling; beam search still goes through `generate`."""

import threading

import pytest
import torch
from PIL import Image
from transformers import TextIteratorStreamer, TextStreamer

from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.engine import ChatSession, GenerationCancelled, GenerationSettings
from tests.conftest import make_tiny_chat_model

LONG = GenerationSettings(max_new_tokens=24)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=1, image_std=0.5)


def _conversation(session):
    session.add_image(Image.new("RGB", (40, 40), "red"))
    replies = [session.ask("what is it", LONG)]
    session.add_image(Image.new("RGB", (40, 40), "blue"))
    replies.append(session.ask("and this", LONG))
    replies.append(session.ask("what", GenerationSettings(max_new_tokens=10, stop=(replies[0][2:4],))))
    return replies


def test_same_replies_as_generate_over_a_conversation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = _conversation(ChatSession(model, tokenizer))
    fast = _conversation(ChatSession(model, tokenizer, decoder=GraphDecoder(model, max_cache_len=32)))
    assert fast == plain and len(plain[0]) > 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_same_replies_with_cuda_graphs():
    model, tokenizer = make_tiny_chat_model(seed=1, image_std=0.5)
    plain = _conversation(ChatSession(model, tokenizer))
    model = model.cuda()
    decoder = GraphDecoder(model, max_cache_len=32)
    assert decoder.cuda_graphs and _conversation(ChatSession(model, tokenizer, decoder=decoder)) == plain


def test_streams_the_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, decoder=GraphDecoder(model, check_every=3))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("reply", session.ask("what is it", LONG, streamer)))
    worker.start()
    streamed = "".join(streamer)
    worker.join(timeout=60)
    assert streamed.strip() == result["reply"] != ""


def test_cancel_stops_between_chunks_and_keeps_the_session(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, decoder=GraphDecoder(model, check_every=2))
    session.add_image(Image.new("RGB", (40, 40), "red"))

    class CancelOnSecondChunk(TextStreamer):
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 3:  # the empty prompt, the first token, then a chunk
                session.cancel()
            super().put(value)

    with pytest.raises(GenerationCancelled):
        session.ask("what", GenerationSettings(max_new_tokens=200), CancelOnSecondChunk(tokenizer))
    assert session.turns == [] and len(session.pending_images) == 1


def test_penalty_equals_generate_and_seeded_sampling_repeats(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = GraphDecoder(model)
    penalised = GenerationSettings(max_new_tokens=24, repetition_penalty=1.5)
    assert ChatSession(model, tokenizer, decoder=decoder).ask("what", penalised) == \
        ChatSession(model, tokenizer).ask("what", penalised)
    sampled = GenerationSettings(max_new_tokens=24, do_sample=True, temperature=1.5, top_p=0.95, top_k=40, seed=7)
    replies = {ChatSession(model, tokenizer, decoder=decoder).ask("what", sampled) for _ in range(3)}
    assert len(replies) == 1
    assert replies != {ChatSession(model, tokenizer, decoder=decoder).ask("what", GenerationSettings(
        max_new_tokens=24, do_sample=True, temperature=1.5, seed=8))}


def test_beam_search_uses_generate(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    decoder = GraphDecoder(model)
    session = ChatSession(model, tokenizer, decoder=decoder)
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: pytest.fail("graph decoder used"))
    session.ask("what", GenerationSettings(max_new_tokens=4, num_beams=2))
    other, _ = make_tiny_chat_model(seed=2)
    with pytest.raises(ValueError, match="another model"):
        ChatSession(other, tokenizer, decoder=decoder)
