"""Invariants of the composite model: image rows on placeholders, label masking, frozen parts, generation."""

import pytest
import torch

from minigpt4qwen.model.activation_checkpointing import apply_activation_checkpointing
from minigpt4qwen.model.parts import PartDtypes, TrainableParts
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_model

P = [IMAGE_TOKEN_ID] * NUM_QUERIES


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(n))


def test_image_rows_land_on_placeholders_in_order(tiny_model):
    pad = 0
    # sample 0: right padded, one image; sample 1: two images; sample 2: left padded, one image.
    ids = torch.tensor([
        [2, 3, *P, 7, 8, pad, pad, pad, pad, pad],
        [2, *P, 9, *P, 10, 11, 12],
        [pad, pad, pad, pad, pad, 2, 3, 4, *P, 13],
    ])
    feats = torch.randn(4, NUM_QUERIES, tiny_model.config.text_config.hidden_size)
    embeds = tiny_model.embed(ids, feats)
    table = tiny_model.language_model.get_input_embeddings().weight
    placeholder_rows = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1]) if ids[b, t] == IMAGE_TOKEN_ID]
    assert len(placeholder_rows) == 4 * NUM_QUERIES
    for k, (b, t) in enumerate(placeholder_rows):
        assert torch.equal(embeds[b, t], feats[k // NUM_QUERIES, k % NUM_QUERIES])
    text = ids != IMAGE_TOKEN_ID
    assert torch.equal(embeds[text], table[ids[text]])


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model):
    ids = torch.tensor([[2, *P, 3]])
    with pytest.raises(ValueError, match="placeholder"):
        tiny_model.embed(ids, torch.randn(2, NUM_QUERIES, 32))
    with pytest.raises(ValueError, match="partial run"):
        tiny_model.embed(torch.tensor([[2, *P[:-1], 3], [IMAGE_TOKEN_ID, 1, 1, 1, 1]]), torch.randn(1, NUM_QUERIES, 32))


def test_loss_counts_only_supervised_tokens(tiny_model):
    ids = torch.tensor([[2, *P, 7, 8, 9, 10], [2, *P, 11, 12, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    labels[1, -4:-2] = ids[1, -4:-2]
    mask = (ids != 0).long()
    out = tiny_model(ids, mask, labels=labels, pixel_values=_images(2))
    assert out.num_tokens == 5
    logits = tiny_model(ids, mask, pixel_values=_images(2)).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


def test_frozen_parts_stay_in_eval_and_gradients_reach_the_projection():
    model = make_tiny_model()
    model.set_trainable(TrainableParts())  # the original recipe: projection only
    apply_activation_checkpointing(model, vision=True, language_model=True)
    model.train()
    assert not model.qformer.training and not model.vision_model.training and not model.language_model.training
    assert model.language_projection.training
    ids = torch.tensor([[2, *P, 7, 8, 9]])
    out = model(ids, labels=ids.masked_fill(ids == IMAGE_TOKEN_ID, -100), pixel_values=_images(1))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"language_projection.weight", "language_projection.bias"}
    assert model.language_projection.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model()
        model.set_trainable(TrainableParts(vision_model=True, language_model=True))
        if checkpointing:
            apply_activation_checkpointing(model, vision=True, language_model=True)
        model.train()
        ids = torch.tensor([[2, *P, 7, 8, 9]])
        model(ids, labels=ids, pixel_values=_images(1)).loss.backward()
        grads.append({k: v.grad.clone() for k, v in model.state_dict(keep_vars=True).items() if v.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


def _greedy_without_cache(model, ids, feats, steps):
    ids = ids.clone()
    for _ in range(steps):
        nxt = model(ids, image_features=feats).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, -steps:]


def test_generation_with_kv_cache_equals_no_cache_and_stops_at_eos(tiny_model):
    ids = torch.tensor([[2, 3, *P, 7, 8]])
    feats = tiny_model.encode_images(_images(1))
    ref = _greedy_without_cache(tiny_model, ids, feats, 8)
    out = tiny_model.generate(ids, image_features=feats, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    eos = int(ref[0, 3])
    first = int((ref[0] == eos).nonzero()[0])
    stopped = tiny_model.generate(ids, image_features=feats, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)
    assert stopped[0].tolist() == ref[0, : first + 1].tolist()


def test_left_padded_batch_generates_like_single_prompts(tiny_model):
    a = torch.tensor([[2, 3, *P, 7, 8, 9, 10]])
    b = torch.tensor([[2, *P, 11]])
    feats = tiny_model.encode_images(_images(2))
    singles = [tiny_model.generate(x, image_features=f[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
               for x, f in ((a, feats[0]), (b, feats[1]))]
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones_like(a), torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(b)], 1)])
    out = tiny_model.generate(batch, mask, image_features=feats, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], singles[0][0]) and torch.equal(out[1], singles[1][0])


def test_cast_parts_keeps_the_projection_in_fp32(tiny_model):
    tiny_model.cast_parts(PartDtypes("bf16", "bf16", "fp32", "fp32", "bf16"))
    assert tiny_model.part_dtype("vision_model") == torch.bfloat16
    assert tiny_model.language_projection.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(torch.tensor([[2, *P, 7]]), labels=torch.tensor([[-100, *[-100] * 4, 7]]),
                         pixel_values=_images(1))
    assert torch.isfinite(out.loss)
