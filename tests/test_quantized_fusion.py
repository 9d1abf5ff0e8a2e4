"""Fused projections over torchao quantized weights (`model/quantized_rows.py`): the fused weight is exactly the
parts' rows stacked (dequantized, bit for bit), the LLM's logits and greedy tokens stay those of the unfused
quantized LLM, and what cannot be stacked is left unfused. int8 and the CPU's int4 here; CUDA's tile-packed int4
(its fused layers routed again through the dequantized many-row path) on a GPU.

Tolerance: as tests/test_fused_projections.py, a GEMM of another width may block its float32 sums differently.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

pytest.importorskip("torchao")

from minigpt4qwen.model.fused_projections import FusedAttention, FusedMLP, fuse_projections  # noqa: E402
from minigpt4qwen.model.quantization import quantize_llm_weights  # noqa: E402
from minigpt4qwen.model.quantized_rows import stack_rows, stacking_problem  # noqa: E402

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def quantized_llm(mode: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  kv_heads: int = 2) -> torch.nn.Module:
    """A frozen tiny Qwen2 (4 query heads of 32 over `kv_heads` key/value heads, widths multiples of int4's
    128-wide groups), its Linear layers quantized in `mode`."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    llm.eval().requires_grad_(False)
    quantize_llm_weights(llm, mode)
    return llm


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values as its own kernel computes with them: the product with the identity (the CPU's int4
    tensor has no `dequantize`); exact, each output picks one weight value."""
    identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    return torch.nn.functional.linear(identity, weight).t()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_weights_are_the_parts_stacked_and_the_logits_stay(mode):
    dtype = torch.bfloat16 if mode == "int4" else torch.float32  # the CPU's int4 kernel takes bf16
    llm = quantized_llm(mode, dtype=dtype)
    fused = copy.deepcopy(llm)
    assert fuse_projections(fused) == 2
    for unfused, layer in zip(llm.model.layers, fused.model.layers):
        assert type(layer.self_attn) is FusedAttention and type(layer.mlp) is FusedMLP
        parts = [unfused.self_attn.q_proj, unfused.self_attn.k_proj, unfused.self_attn.v_proj]
        qkv = layer.self_attn.qkv_proj.weight
        assert type(qkv) is type(parts[0].weight) and qkv.shape == (sum(p.out_features for p in parts), 128)
        assert torch.equal(dequantized(qkv), torch.cat([dequantized(p.weight) for p in parts]))
        gate_up = layer.mlp.gate_up_proj.weight
        assert torch.equal(dequantized(gate_up), torch.cat([dequantized(unfused.mlp.gate_proj.weight),
                                                            dequantized(unfused.mlp.up_proj.weight)]))
    ids = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    expected, got = (m(input_ids=ids).logits.float() for m in (llm, fused))
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, **(TOLERANCE if mode == "int8" else
                                                                  {"rtol": 0.0, "atol": 2**-7}))
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(fused.generate(ids, **greedy), llm.generate(ids, **greedy))


def test_what_cannot_be_stacked_stays_unfused():
    llm = quantized_llm("int8")
    attention = llm.model.layers[0].self_attn
    attention.k_proj.weight = torch.nn.Parameter(dequantized(attention.k_proj.weight), requires_grad=False)
    assert fuse_projections(llm) == 2  # layer 0's MLP and all of layer 1
    assert type(llm.model.layers[0].self_attn).__name__ == "Qwen2Attention"
    assert type(llm.model.layers[0].mlp) is FusedMLP
    q, v = attention.q_proj.weight, attention.v_proj.weight
    assert stacking_problem([q, v]) is None
    assert "different schemes" in stacking_problem([q, type(v)(v.qdata, v.scale, [1, 64], v.dtype, v.zero_point)])
    assert "zero points" in stacking_problem([q, type(v)(v.qdata, v.scale, v.block_size, v.dtype)])
    with pytest.raises(ValueError, match="cannot stack"):
        stack_rows([q, attention.k_proj.weight])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tile-packed int4)")
def test_tile_packed_int4_stacks_and_its_fused_layers_take_the_many_row_path():
    from minigpt4qwen.model.int4_many_rows import DEQUANT_MIN_ROWS, ManyRowInt4Linear

    llm = quantized_llm("int4", device="cuda", dtype=torch.bfloat16)
    fused = copy.deepcopy(llm)
    assert fuse_projections(fused) == 2
    layer = fused.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is ManyRowInt4Linear and type(layer.mlp.gate_up_proj) is ManyRowInt4Linear
    parts = [llm.model.layers[0].mlp.gate_proj.weight, llm.model.layers[0].mlp.up_proj.weight]
    assert torch.equal(dequantized(layer.mlp.gate_up_proj.weight), torch.cat([dequantized(w) for w in parts]))
    for rows in (1, DEQUANT_MIN_ROWS):  # tinygemm, then the dequantized path
        ids = torch.randint(2, 64, (1, rows), device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
        expected, got = (m(input_ids=ids).logits.float() for m in (llm, fused))
        torch.testing.assert_close(got, expected, rtol=0.0, atol=2**-7 * expected.abs().max().item())


def test_cpu_int4_rows_packed_in_blocks_are_stacked_only_in_whole_blocks():
    # ATen's CPU int4 packing lays rows out in blocks of 32-64; with one key/value head k and v have 32 rows each,
    # and stacking q, k, v would scramble them: the attention stays unfused, the MLP (256 + 256 rows) fuses.
    llm = quantized_llm("int4", dtype=torch.bfloat16, kv_heads=1)
    ids = torch.randint(2, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = llm(input_ids=ids).logits
    assert fuse_projections(llm) == 2
    assert all(type(layer.self_attn).__name__ == "Qwen2Attention" and type(layer.mlp) is FusedMLP
               for layer in llm.model.layers)
    attention = llm.model.layers[0].self_attn
    assert "blocks of 64 rows" in stacking_problem([attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(llm(input_ids=ids).logits, expected)
