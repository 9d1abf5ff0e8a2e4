"""Fused q/k/v and gate/up projections: the same logits as the unfused LLM (full forward and cached decoding, on
tiny Qwen2, Llama and Qwen3 LLMs with grouped-query attention and random biases and norms), the same greedy tokens
from the CUDA-graph decoder, the scheduler and beam search, no more parameters, and no fusing of a trainable LLM
(over quantized weights: tests/test_quantized_fusion.py).

Tolerance: the fused GEMM sums the same products as the separate ones, but a GEMM of another width may block its
float32 sums differently; logits (of order 0.5) agree to 1e-6 relative and absolute (measured: 6e-8).
"""

import argparse
import copy
import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from minigpt4qwen.checkpoint.export import export_hf
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.generation import GenerationSettings
from minigpt4qwen.inference.loading import add_model_options, load_for_inference
from minigpt4qwen.model.fused_projections import FusedAttention, FusedMLP, fuse_projections
from tests.conftest import IMAGE_TOKEN_ID, NUM_QUERIES, make_tiny_chat_model, make_tiny_model

TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
FAMILIES = {
    "qwen2": lambda **sizes: Qwen2Config(**sizes),
    "llama": lambda **sizes: LlamaConfig(**sizes, attention_bias=True, mlp_bias=True),
    "qwen3": lambda **sizes: Qwen3Config(**sizes, head_dim=8),
}


def tiny_llm(family: str, attention: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A frozen fp32 LLM of the family (4 query heads over 2 key/value heads) with random biases and norms."""
    torch.manual_seed(seed)
    config = FAMILIES[family](vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return llm.eval().requires_grad_(False)


def fused_copy(model: torch.nn.Module, layers: int = 2) -> torch.nn.Module:
    fused = copy.deepcopy(model)
    assert fuse_projections(getattr(fused, "language_model", fused)) == layers
    return fused


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_logits_match(family, attention):
    llm = tiny_llm(family, attention)
    fused = fused_copy(llm)
    assert all(type(layer.self_attn) is FusedAttention and type(layer.mlp) is FusedMLP for layer in fused.model.layers)
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name, _ in fused.named_parameters())
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    expected, got = (m(input_ids=ids, attention_mask=mask).logits for m in (llm, fused))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOLERANCE)
    assert not torch.equal(expected, tiny_llm(family, attention, seed=1)(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_logits_match_step_by_step(family, cache):
    llm = tiny_llm(family)
    fused = fused_copy(llm)
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True, cache_implementation=None if cache == "dynamic" else "static")
    expected, got = (m.generate(ids, **kwargs) for m in (llm, fused))
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), **TOLERANCE)


def test_memory_does_not_grow_and_the_originals_are_freed():
    llm = tiny_llm("qwen2")
    count = sum(p.numel() for p in llm.parameters())
    originals = [weakref.ref(llm.model.layers[0].self_attn.q_proj.weight), weakref.ref(llm.model.layers[1].mlp.up_proj)]
    assert fuse_projections(llm) == 2
    gc.collect()
    assert sum(p.numel() for p in llm.parameters()) == count
    assert [ref() for ref in originals] == [None, None]  # replaced, not kept beside the fused weights
    assert fuse_projections(llm) == 0  # nothing left to fuse


def test_refuses_a_trainable_llm_and_leaves_it_unchanged():
    llm = tiny_llm("qwen2")
    llm.model.layers[1].mlp.down_proj.requires_grad_(True)
    with pytest.raises(ValueError, match=r"inference only.*down_proj.*requires_grad_\(False\)"):
        fuse_projections(llm)
    assert type(llm.model.layers[0].self_attn).__name__ == "Qwen2Attention"


def test_fuses_quantized_layers_beside_unquantized_ones():  # quantized fusion itself: tests/test_quantized_fusion.py
    pytest.importorskip("torchao")
    from minigpt4qwen.model.quantization import quantize_llm_weights

    llm = tiny_llm("qwen2")
    quantize_llm_weights(llm.model.layers[0], "int8")
    expected = llm(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert fuse_projections(llm) == 2
    assert type(llm.model.layers[0].self_attn.qkv_proj.weight).__name__ == "Int8Tensor"
    assert type(llm.model.layers[1].self_attn.qkv_proj.weight) is torch.nn.Parameter
    torch.testing.assert_close(llm(input_ids=torch.tensor([[3, 4, 5]])).logits, expected, **TOLERANCE)


def _prompt(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[2, 3, *[IMAGE_TOKEN_ID] * NUM_QUERIES, *torch.randint(6, 60, (5,), generator=g).tolist()]])
    return ids, torch.randn(1, 3, 28, 28, generator=g)


def test_graph_decoder_and_beam_search_give_the_same_tokens():
    model = make_tiny_model(seed=3).requires_grad_(False)
    fused = fused_copy(model)
    decoders = [GraphDecoder(m, max_cache_len=64, check_every=4, rehearse_captures=True) for m in (model, fused)]
    for seed in (1, 2):
        ids, px = _prompt(seed)
        expected, got = (d.generate(ids, pixel_values=px, max_new_tokens=16) for d in decoders)
        assert torch.equal(got, expected)
        beams = [m.generate(ids, pixel_values=px, max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0,
                            eos_token_id=None) for m in (model, fused)]
        assert torch.equal(beams[0], beams[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoder_gives_the_same_tokens():
    model = make_tiny_model(seed=3).requires_grad_(False).cuda()
    decoders = [GraphDecoder(m, max_cache_len=64, check_every=4) for m in (model, fused_copy(model))]
    for seed in (1, 2):
        ids, px = _prompt(seed)
        expected, got = (d.generate(ids.cuda(), pixel_values=px.cuda(), max_new_tokens=16) for d in decoders)
        assert torch.equal(got, expected)


def _scheduler_answers(model, tokenizer, prompts):
    scheduler = GenerationScheduler(model, tokenizer, slots=4, capacity=96, check_every=4, rehearse_captures=True)
    try:
        handles = [scheduler.submit(ids, pixel_values=px, settings=GenerationSettings(max_new_tokens=12))
                   for ids, px in prompts]
        return [(handle.result(30), handle.token_ids) for handle in handles]
    finally:
        scheduler.close()


def test_scheduler_gives_the_same_answers():
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    model.requires_grad_(False)
    placeholder = [model.image_token_id] * model.num_query_tokens
    g = torch.Generator().manual_seed(0)
    prompts = [(torch.tensor([placeholder + tokenizer(text)["input_ids"]]), torch.randn(1, 3, 28, 28, generator=g))
               for text in ("what colour is the shape", "图 中 的 形 状 是 什 么", "red green blue")]
    expected = _scheduler_answers(model, tokenizer, prompts)
    assert len({text for text, _ in expected}) == len(prompts)  # distinct answers, so the comparison can fail
    assert _scheduler_answers(fused_copy(model), tokenizer, prompts) == expected


def test_load_for_inference_fuses(tmp_path):
    model, tokenizer = make_tiny_chat_model(seed=1, image_std=0.5)
    export_hf(model, tokenizer, tmp_path / "export")
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    loaded, _ = load_for_inference(parser.parse_args(["--model-dir", str(tmp_path / "export")]))
    layers = loaded.language_model.model.layers
    assert all(type(layer.self_attn) is FusedAttention and type(layer.mlp) is FusedMLP for layer in layers)
    ids = torch.tensor([[model.image_token_id] * model.num_query_tokens + tokenizer("what is it")["input_ids"]])
    kwargs = dict(pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=12, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    assert torch.equal(loaded.generate(ids, **kwargs), model.eval().generate(ids, **kwargs))
    with pytest.raises(ValueError, match="fused for decoding"):  # its weight names are not the checkpoint's
        export_hf(loaded, tokenizer, tmp_path / "again")
    assert not (tmp_path / "again").exists()
