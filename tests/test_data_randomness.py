"""Seeded randomness of the data layer: image transforms (shape, normalisation, crops) and the sampler's order."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minigpt4qwen.data.images import CLIP_MEAN, CLIP_STD, ImageTransform, random_resized_crop_box
from minigpt4qwen.data.sampler import ShardedSampler


def test_transforms_shape_normalisation_and_seeded_randomness():
    flat = Image.new("RGB", (50, 30), (255, 128, 0))
    eval_out = ImageTransform(20, train=False)(flat)
    assert eval_out.shape == (3, 20, 20) and eval_out.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(eval_out.mean(dim=(1, 2)), expected, atol=1e-5)
    image = Image.new("RGB", (48, 36), "red")
    ImageDraw.Draw(image).rectangle((4, 4, 12, 12), fill="gray")
    assert torch.equal(ImageTransform(16, train=False)(image), ImageTransform(16, train=False)(image))
    train = ImageTransform(16, train=True)
    draws = [train(image, torch.Generator().manual_seed(s)) for s in (0, 0, 1, 2, 3)]
    assert torch.equal(draws[0], draws[1])
    assert any(not torch.equal(draws[0], d) for d in draws[2:])
    assert all(d.shape == (3, 16, 16) for d in draws)


def test_random_resized_crop_respects_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(64, 48, (0.5, 1.0), (3 / 4, 4 / 3), generator)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.45 <= w * h / (64 * 48) <= 1.0 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A strip no crop of the allowed aspect fits in: the centred crop with the nearest allowed aspect.
    assert random_resized_crop_box(100, 10, (0.5, 1.0), (3 / 4, 4 / 3), generator) == (43, 0, 56, 10)


def rank_orders(n, batch_size, epoch=0, replicas=2, **kwargs):
    # One global batch per mega-batch: with fewer samples than a mega-batch, grouping would be a full sort.
    samplers = [
        ShardedSampler(n, batch_size, num_replicas=replicas, rank=r, seed=7, megabatch_mult=1, **kwargs)
        for r in range(replicas)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("grouped", [False, True])
def test_sampler_is_deterministic_sharded_and_resumable(grouped):
    lengths = list(np.random.default_rng(0).integers(10, 500, size=23)) if grouped else None
    a, b = rank_orders(23, 4, lengths=lengths)
    assert (a, b) == tuple(rank_orders(23, 4, lengths=lengths))  # same (seed, epoch): same order
    assert (a, b) != tuple(rank_orders(23, 4, epoch=1, lengths=lengths))
    assert len(a) == len(b) == 12 and set(a) | set(b) == set(range(23))  # padded by one repeat
    even_a, even_b = rank_orders(24, 4, lengths=lengths + [3] if grouped else None)
    assert not set(even_a) & set(even_b) and set(even_a) | set(even_b) == set(range(24))
    resumed = ShardedSampler(23, 4, num_replicas=2, rank=1, seed=7, lengths=lengths, megabatch_mult=1)
    resumed.set_epoch(0, start=5)
    assert list(resumed) == b[5:] and len(resumed) == 7
    with pytest.raises(ValueError, match="start 13"):
        resumed.set_epoch(0, start=13)


def test_length_grouping_pads_less_and_puts_the_longest_batch_first():
    lengths = np.random.default_rng(1).integers(10, 1000, size=400)
    waste = {}
    for grouped in (False, True):
        order = ShardedSampler(400, 8, lengths=lengths if grouped else None, megabatch_mult=10).global_order()
        batches = lengths[order].reshape(-1, 8)
        waste[grouped] = int((batches.max(1, keepdims=True) - batches).sum())
        if grouped:
            assert batches[0].max() == lengths.max()
    assert waste[True] < waste[False] / 4
