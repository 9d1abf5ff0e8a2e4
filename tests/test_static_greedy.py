"""The fast greedy decoder gives exactly the tokens of `MiniGPT4Qwen.generate`, whatever the prompt's padding
bucket and whatever an earlier prompt left in the cache, and its step functions are capturable as CUDA graphs."""

import functools
import sys

import pytest
import torch
import transformers.masking_utils

from minigpt4qwen.inference.cuda_graphs import host_syncs
from minigpt4qwen.inference.static_greedy import StaticGreedyDecoder, prefill_bucket
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_model


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def _prompt(extra_text: int = 0, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    text = [t for t in torch.randint(1, 60, (extra_text,), generator=g).tolist() if t != IMAGE_TOKEN_ID]
    ids = torch.tensor([[2, 3, *[IMAGE_TOKEN_ID] * NUM_QUERIES, 7, 8, 9, *text]])
    return ids, torch.randn(1, 3, 28, 28, generator=g)


def _reference(model, ids, px, n=20):
    return model.generate(ids, pixel_values=px, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_prefill_buckets():
    assert [prefill_bucket(n, 10_000) for n in (1, 64, 65, 512, 513, 769, 1025, 1537, 2049)] == \
        [64, 64, 128, 512, 768, 1024, 1536, 2048, 3072]
    assert prefill_bucket(100, 90) == 90  # never beyond the cache


def test_same_tokens_as_generate_across_buckets_and_after_longer_prompts(model):
    decoder = StaticGreedyDecoder(model, max_cache_len=256, check_every=4)
    # long first (bucket 128): its keys/values stay in the cache beyond the shorter prompts that follow
    for extra, seed in ((80, 1), (0, 2), (50, 3), (0, 2)):
        ids, px = _prompt(extra, seed)
        assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px)), extra


def test_stops_at_the_first_stop_token_and_streams_every_token(model):
    ids, px = _prompt()
    decoder = StaticGreedyDecoder(model, max_cache_len=64, check_every=4)
    full = decoder.generate(ids, pixel_values=px, max_new_tokens=20)
    stop = int(full[0, 6])
    first = int((full[0] == stop).nonzero()[0])
    chunks = []
    out = decoder.generate(ids, pixel_values=px, max_new_tokens=20, stop_token_ids=[stop], on_tokens=chunks.append)
    assert out[0].tolist() == full[0, : first + 1].tolist()
    assert len(chunks[0]) == 1 and [t for chunk in chunks for t in chunk] == out[0].tolist()


def test_should_stop_ends_after_the_current_chunk(model):
    ids, px = _prompt()
    decoder = StaticGreedyDecoder(model, max_cache_len=64, check_every=4)
    calls = []
    out = decoder.generate(ids, pixel_values=px, max_new_tokens=20, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert out.shape[1] == 1 + 4  # the prefill's token, then one chunk


def test_grows_the_cache_or_refuses(model):
    ids, px = _prompt(30)
    grown = StaticGreedyDecoder(model, max_cache_len=16, check_every=4)
    assert torch.equal(grown.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px))
    assert grown.max_cache_len >= ids.shape[1] + 20
    fixed = StaticGreedyDecoder(model, max_cache_len=20, grow=False)
    with pytest.raises(ValueError, match="max_cache_len"):
        fixed.generate(ids, pixel_values=px, max_new_tokens=50)
    with pytest.raises(ValueError, match="one prompt"):
        fixed.generate(ids.repeat(2, 1), pixel_values=px.repeat(2, 1, 1, 1))


def test_step_functions_never_synchronise_with_the_host(model, monkeypatch):
    # Under a capture transformers sees a capturing stream and skips its eager-only shortcuts; mimic that here.
    tracing_module = sys.modules[transformers.masking_utils.is_tracing.__module__]
    monkeypatch.setattr(tracing_module, "is_cuda_stream_capturing", lambda: True)
    decoder = StaticGreedyDecoder(model, max_cache_len=64)
    ids, px = _prompt()
    decoder.generate(ids, pixel_values=px, max_new_tokens=2)
    assert host_syncs(functools.partial(decoder._prefill_step, 64)) == []
    assert host_syncs(decoder._decode_step) == []
    assert host_syncs(lambda: model.encode_images(px)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_tokens():
    model = make_tiny_model(seed=3).cuda()
    decoder = StaticGreedyDecoder(model, max_cache_len=32, check_every=4)  # grows: re-captures every graph
    assert decoder.cuda_graphs
    for extra, seed in ((80, 1), (0, 2), (50, 3)):
        ids, px = (t.cuda() for t in _prompt(extra, seed))
        # cuBLAS may pick other kernels under a capture: equal to rounding, not bit for bit
        torch.testing.assert_close(decoder.encode_images(px), model.encode_images(px), rtol=1e-4, atol=1e-5)
        assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px)), extra
