"""The static-cache greedy decoder gives exactly the tokens of `MiniGPT4Qwen.generate` and stops where it does."""

import pytest
import torch

from minigpt4qwen.inference.static_greedy import StaticGreedyDecoder
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_model


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def _prompt():
    ids = torch.tensor([[2, 3, *[IMAGE_TOKEN_ID] * NUM_QUERIES, 7, 8, 9]])
    return ids, torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def test_same_tokens_as_generate_and_cache_reuse(model):
    ids, px = _prompt()
    decoder = StaticGreedyDecoder(model, max_cache_len=64, compile=False, check_every=4)
    expected = model.generate(ids, pixel_values=px, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), expected)
    assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), expected)  # after cache.reset()


def test_stops_at_the_first_stop_token(model):
    ids, px = _prompt()
    decoder = StaticGreedyDecoder(model, max_cache_len=64, compile=False, check_every=4)
    full = decoder.generate(ids, pixel_values=px, max_new_tokens=20)
    stop = int(full[0, 6])
    first = int((full[0] == stop).nonzero()[0])
    out = decoder.generate(ids, pixel_values=px, max_new_tokens=20, stop_token_ids=[stop])
    assert out[0].tolist() == full[0, : first + 1].tolist()


def test_refuses_batches_and_overlong_requests(model):
    ids, px = _prompt()
    decoder = StaticGreedyDecoder(model, max_cache_len=20, compile=False)
    with pytest.raises(ValueError, match="one prompt"):
        decoder.generate(ids.repeat(2, 1), pixel_values=px.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="max_cache_len"):
        decoder.generate(ids, pixel_values=px, max_new_tokens=50)
