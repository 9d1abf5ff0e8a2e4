"""The fast greedy decoder gives exactly the tokens of `MiniGPT4Qwen.generate`, whatever the prompt's padding
bucket and whatever an earlier prompt left in the cache, and its step functions are capturable as CUDA graphs."""

import copy
import functools
import sys

import pytest
import torch
import transformers.masking_utils

from minigpt4qwen.inference.decoding.cuda_graphs import host_syncs
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder, prefill_bucket
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
    # Rehearsed captures: each step also runs where a GPU would capture it, on the state a capture meets.
    decoder = GraphDecoder(model, max_cache_len=256, check_every=4, rehearse_captures=True)
    # long first (bucket 128): its keys/values stay in the cache beyond the shorter prompts that follow
    for extra, seed in ((80, 1), (0, 2), (50, 3), (0, 2)):
        ids, px = _prompt(extra, seed)
        assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px)), extra


def test_stops_at_the_first_stop_token_and_streams_every_token(model):
    ids, px = _prompt()
    decoder = GraphDecoder(model, max_cache_len=64, check_every=4)
    full = decoder.generate(ids, pixel_values=px, max_new_tokens=20)
    stop = int(full[0, 6])
    first = int((full[0] == stop).nonzero()[0])
    chunks = []
    out = decoder.generate(ids, pixel_values=px, max_new_tokens=20, stop_token_ids=[stop], on_tokens=chunks.append)
    assert out[0].tolist() == full[0, : first + 1].tolist()
    assert len(chunks[0]) == 1 and [t for chunk in chunks for t in chunk] == out[0].tolist()


def test_should_stop_ends_after_the_current_chunk(model):
    ids, px = _prompt()
    decoder = GraphDecoder(model, max_cache_len=64, check_every=4)
    calls = []
    out = decoder.generate(ids, pixel_values=px, max_new_tokens=20,
                           should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert out.shape[1] == 1 + 4  # the prefill's token, then one chunk


def test_grows_the_cache_or_refuses(model):
    ids, px = _prompt(30)
    grown = GraphDecoder(model, max_cache_len=16, check_every=4)
    assert torch.equal(grown.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px))
    assert grown.max_cache_len >= ids.shape[1] + 20
    fixed = GraphDecoder(model, max_cache_len=20, grow=False)
    with pytest.raises(ValueError, match="max_cache_len"):
        fixed.generate(ids, pixel_values=px, max_new_tokens=50)
    with pytest.raises(ValueError, match="one prompt"):
        fixed.generate(ids.repeat(2, 1), pixel_values=px.repeat(2, 1, 1, 1))


def test_repetition_penalty_and_top_k_1_equal_generate_greedy(model):
    ids, px = _prompt()
    decoder = GraphDecoder(model, check_every=4)
    expected = model.generate(ids, pixel_values=px, max_new_tokens=20, do_sample=False, pad_token_id=0,
                              eos_token_id=None, repetition_penalty=1.8)
    assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20, repetition_penalty=1.8), expected)
    greedy = _reference(model, ids, px)
    assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20, do_sample=True, top_k=1), greedy)


def _warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' own warpers: the distribution `generate(do_sample=True)` draws from."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None].float()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


@pytest.fixture(scope="module")
def peaked_model(model):
    """The tiny model with 10x logits: a spread-out but far from uniform next-token distribution (top 0.14)."""
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.language_model.get_output_embeddings().weight.mul_(10)
    return peaked


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.8)])
def test_sampling_draws_from_transformers_distribution(peaked_model, temperature, top_k, top_p):
    ids, px = _prompt()
    with torch.no_grad():
        features = peaked_model.encode_images(px)
        logits = peaked_model(ids, image_features=features).logits[0, -1]
    expected = _warped_probs(logits, temperature, top_k or 10_000, top_p) * 3000
    decoder = GraphDecoder(peaked_model)
    counts = torch.zeros_like(expected)
    torch.manual_seed(0)
    for _ in range(3000):
        token = decoder.generate(ids, image_features=features, max_new_tokens=1, do_sample=True,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
        counts[token] += 1
    assert counts[expected == 0].sum() == 0  # nothing outside top-k / top-p
    # Pearson's chi-square, rare tokens pooled: a wrong temperature or cut-off is hundreds of sigmas off.
    big, rare = expected >= 5, (expected > 0) & (expected < 5)
    observed = torch.cat([counts[big], counts[rare].sum()[None]])
    wanted = torch.cat([expected[big], expected[rare].sum()[None]])
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    chi2, dof = float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)


def test_step_functions_never_synchronise_with_the_host(model, monkeypatch):
    # Under a capture transformers sees a capturing stream and skips its eager-only shortcuts; mimic that here.
    tracing_module = sys.modules[transformers.masking_utils.is_tracing.__module__]
    monkeypatch.setattr(tracing_module, "is_cuda_stream_capturing", lambda: True)
    decoder = GraphDecoder(model, max_cache_len=64)
    ids, px = _prompt()
    decoder.generate(ids, pixel_values=px, max_new_tokens=2)
    for sample in (False, True):
        assert host_syncs(functools.partial(decoder._prefill_step, 64, sample)) == []
        assert host_syncs(functools.partial(decoder._decode_step, sample)) == []
    assert host_syncs(lambda: model.encode_images(px)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_tokens():
    model = make_tiny_model(seed=3).cuda()
    decoder = GraphDecoder(model, max_cache_len=32, check_every=4)  # grows: re-captures every graph
    assert decoder.cuda_graphs
    for extra, seed in ((80, 1), (0, 2), (50, 3)):
        ids, px = (t.cuda() for t in _prompt(extra, seed))
        # cuBLAS may pick other kernels under a capture: equal to rounding, not bit for bit
        torch.testing.assert_close(decoder.encode_images(px), model.encode_images(px), rtol=1e-4, atol=1e-5)
        assert torch.equal(decoder.generate(ids, pixel_values=px, max_new_tokens=20), _reference(model, ids, px)), extra


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampling_is_seeded_and_draws_from_the_distribution(peaked_model):
    model = copy.deepcopy(peaked_model).cuda()
    ids, px = (t.cuda() for t in _prompt())
    decoder = GraphDecoder(model)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=8, top_p=0.8)
    first = decoder.generate(ids, pixel_values=px, seed=3, **kw)
    assert torch.equal(decoder.generate(ids, pixel_values=px, seed=3, **kw), first)
    assert torch.equal(decoder.generate(ids, pixel_values=px, do_sample=True, top_k=1, max_new_tokens=12),
                       _reference(model, ids, px, 12))
    with torch.no_grad():
        features = model.encode_images(px)
        expected = _warped_probs(model(ids, image_features=features).logits[0, -1], 1.0, 8, 0.8) * 2000
    counts = torch.zeros_like(expected)
    for _ in range(2000):
        counts[decoder.generate(ids, image_features=features, max_new_tokens=1, do_sample=True, top_k=8,
                                top_p=0.8)] += 1
    kept = expected > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert counts[~kept].sum() == 0 and chi2 < 40, chi2  # at most 8 tokens: 7 degrees of freedom
