"""int4 many-row matmuls through the dequantized weight (`model/int4_many_rows.py`): the unpacking against a
loop-by-loop statement of CUDA's tile packing (`aten._convert_weight_to_int4pack`, 8 inner k-tiles) on the CPU,
and on a GPU against the real packing op and tinygemm's own matmul."""

import pytest
import torch
import torch.nn.functional as F

from minigpt4qwen.model.int4_many_rows import (
    DEQUANT_MIN_ROWS,
    ManyRowInt4Linear,
    dequantize_tile_packed,
    route_many_rows_through_bf16,
    tinygemm_layout_matches,
    unpack_tile_packed,
)


def pack_like_cuda(values: torch.Tensor) -> torch.Tensor:
    """`values` ([n, k], 0..15) packed as CUDA's kernel does it, one lane and word at a time: a lane of tile
    (n_tile, k_outer) takes row `8 n_tile + lane // 4` and four bytes (two columns each, the even one in the high
    nibble) at k-byte offsets `lane % 4 + {0, 4, 8, 12}` of each pair of k-tiles; the word holds the four high
    nibbles in its low 16 bits and the four low nibbles above them."""
    n, k = values.shape
    as_bytes = (values[:, ::2] << 4) | values[:, 1::2]
    packed = torch.zeros(n // 8, k // 128, 32, 4, dtype=torch.int64)
    for n_tile in range(n // 8):
        for k_outer in range(k // 128):
            for lane in range(32):
                row = as_bytes[8 * n_tile + lane // 4]
                for inner in range(0, 8, 2):
                    base = (8 * k_outer + inner) * 8 + lane % 4
                    v = [int(row[base + offset]) for offset in (0, 4, 8, 12)]
                    word = sum((v[i] >> 4) << (4 * i) | (v[i] & 0xF) << (16 + 4 * i) for i in range(4))
                    packed[n_tile, k_outer, lane, inner // 2] = word
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def test_unpacking_inverts_the_cuda_tile_packing():
    values = torch.randint(0, 16, (24, 256), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_tile_packed(pack_like_cuda(values)), values.int())


def test_a_dequantized_weight_applies_each_groups_scale_and_zero():
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 16, (16, 256), generator=gen)
    scale = torch.rand(16, 2, generator=gen) + 0.5  # [n, k / group], groups of 128
    zero = torch.randn(16, 2, generator=gen)
    scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)  # tinygemm's layout
    weight = dequantize_tile_packed(pack_like_cuda(values), scale_and_zero, 128)
    expected = (values.float() - 8) * scale.bfloat16().float().repeat_interleave(128, 1) \
        + zero.bfloat16().float().repeat_interleave(128, 1)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected.bfloat16())
    corner = dequantize_tile_packed(pack_like_cuda(values), scale_and_zero, 128, (10, 200))  # a padded weight's own
    assert torch.equal(corner, weight[:10, :200])
    with pytest.raises(ValueError, match="do not cover"):
        dequantize_tile_packed(pack_like_cuda(values), scale_and_zero, 64)


def test_a_model_without_tile_packed_weights_is_left_alone():
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    assert route_many_rows_through_bf16(layers) == 0
    assert all(type(layer) is torch.nn.Linear for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm's tile packing is CUDA's")
def test_on_a_gpu_many_rows_match_tinygemm_and_few_rows_still_use_it():
    pytest.importorskip("torchao")
    from minigpt4qwen.model.quantization import quantize_llm_weights

    values = torch.randint(0, 16, (40, 1024), device="cuda", dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack(((values[:, ::2] << 4) | values[:, 1::2]).to(torch.uint8), 8)
    assert torch.equal(unpack_tile_packed(packed), values)
    assert tinygemm_layout_matches("cuda:0")

    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(1024, 3000, bias=True, device="cuda", dtype=torch.bfloat16))
    quantize_llm_weights(holder, "int4")  # routes many-row calls as it quantizes
    layer = holder[0]
    assert isinstance(layer, ManyRowInt4Linear)
    for rows in (1, DEQUANT_MIN_ROWS - 1, DEQUANT_MIN_ROWS, 64):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x, layer.weight, layer.bias)  # torchao's int4 matmul: tinygemm at every row count
        got = layer(x)
        assert got.shape == expected.shape
        if rows < DEQUANT_MIN_ROWS:
            assert torch.equal(got, expected)
        else:  # bf16 accumulation orders differ: a few bf16 steps of the output's scale
            assert (got - expected).abs().max() <= 0.02 * expected.abs().max(), rows


def test_the_dequantization_compiles_whole_for_every_shape_with_the_same_numbers():
    # On CUDA it runs compiled with static sizes, once per layer shape: a graph break would split it into passes over
    # the weight.
    compiled = torch.compile(dequantize_tile_packed, dynamic=False, fullgraph=True)  # as on CUDA, + no graph break
    for seed, (n, k, shape) in enumerate([(16, 256, (16, 256)), (24, 384, (20, 300)), (32, 128, (32, 128)),
                                          (8, 512, (8, 500))]):
        gen = torch.Generator().manual_seed(seed)
        packed = pack_like_cuda(torch.randint(0, 16, (n, k), generator=gen))
        scale_and_zero = torch.randn(k // 128, n, 2, generator=gen).bfloat16()
        assert torch.equal(compiled(packed, scale_and_zero, 128, shape),
                           dequantize_tile_packed(packed, scale_and_zero, 128, shape))
