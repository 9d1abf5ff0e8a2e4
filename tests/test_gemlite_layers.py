"""gemlite's kernels over our quantized layers (`model/gemlite_layers.py`, `--quantize-kernels gemlite`).

On the CPU: the refusals (no quantized LLM, no GPU, no gemlite). On a GPU with gemlite: each repacked layer computes
what the torchao layer it came from computes, and a tiny LLM's logits and greedy tokens stay those of torchao's.

Tolerance: int8 keeps the same int8 values and scales, so the two differ only by how the kernels sum in fp32 and round
to bf16 (rtol 2e-2 on bf16 outputs). int4's zero point is stored as `zero - 8 * scale` in bf16 (torchao keeps
`zero`): at most 1/16 of a quantization step per weight (test below), well inside the same tolerance.
"""

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from minigpt4qwen.inference.loading import _route_through_gemlite  # noqa: E402
from minigpt4qwen.model.gemlite_layers import import_gemlite, int4_parts, route_through_gemlite  # noqa: E402
from minigpt4qwen.model.int4_many_rows import dequantize_tile_packed  # noqa: E402
from minigpt4qwen.model.quantization import quantize_language_model  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.test_int4_many_rows import pack_like_cuda  # noqa: E402
from tests.test_quantized_fusion import quantized_llm  # noqa: E402


def test_int4_parts_in_gemlites_form_give_tinygemms_weight():
    """gemlite computes `q * scale + zeros'` with `zeros' = -zeros * scale`, zeros and zeros' rounded to bf16 (as
    `A16Wn` and `GemLiteLinearTriton.pack` store them): tinygemm's weight to within those two roundings."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randint(0, 16, (16, 256), generator=gen)
    scale_and_zero = torch.stack([torch.rand(2, 16, generator=gen) * 0.02 + 0.01,
                                  torch.randn(2, 16, generator=gen) * 0.05], dim=-1).to(torch.bfloat16)
    packed = pack_like_cuda(values)
    q, scale, zeros = int4_parts(packed, scale_and_zero, (10, 256), 128)  # a corner: 10 of the 16 rows
    assert q.dtype == torch.uint8 and torch.equal(q, values[:10].to(torch.uint8))
    scale = scale.bfloat16().float()
    shift = (-zeros.bfloat16().float() * scale).bfloat16().float()
    gemlites = q.float() * scale.repeat_interleave(128, 1) + shift.repeat_interleave(128, 1)
    step = scale.repeat_interleave(128, 1)
    zero = scale_and_zero[..., 1].t()[:10].float().repeat_interleave(128, 1)
    tinygemms = (q.float() - 8) * step + zero  # in fp32, before any rounding of the weight
    assert torch.equal(dequantize_tile_packed(packed, scale_and_zero, 128, (10, 256)), tinygemms.bfloat16())
    # Two bf16 roundings: zeros (in steps, below 16: half a spacing is <= 1/32 of a step), then zeros' (about 8
    # steps: <= 1/32 of a step again).
    assert ((gemlites - tinygemms).abs() / step).max() <= 1 / 16


def test_int4_parts_drop_the_paddings_groups():
    """torchao pads a weight's inputs to a multiple of 1024; a 128-input weight is one group, as gemlite must see it
    (with the padding's 7 groups kept it would take the weight for a grouped one)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 16, (8, 1024), generator=gen)
    scale_and_zero = (torch.rand(8, 8, 2, generator=gen) + 0.5).to(torch.bfloat16)  # [k_pad / 128, n, 2]
    q, scale, zeros = int4_parts(pack_like_cuda(values), scale_and_zero, (8, 128), 128)
    assert q.shape == (8, 128) and scale.shape == zeros.shape == (8, 1)
    assert torch.equal(scale, scale_and_zero[0, :, 0, None].float())
    with pytest.raises(ValueError, match="groups of 64"):
        int4_parts(pack_like_cuda(values), scale_and_zero, (8, 96), 64)


def test_gemlite_needs_a_quantized_llm(tiny_model):
    with pytest.raises(ValueError, match="add --quantize int8"):
        _route_through_gemlite(tiny_model, "cuda")


def test_gemlite_needs_a_gpu():
    model = quantize_language_model(make_tiny_model().requires_grad_(False), "int8")
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        _route_through_gemlite(model, "cpu")


def test_missing_gemlite_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemlite", None)  # `import gemlite` raises ImportError
    import_gemlite.cache_clear()
    try:
        with pytest.raises(ImportError, match="minigpt4qwen\\[gemlite\\]"):
            import_gemlite()
    finally:
        import_gemlite.cache_clear()


def test_quantize_kernels_option_defaults_to_torchao():
    from minigpt4qwen.inference.loading import add_model_options

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert parser.parse_args([]).quantize_kernels == "torchao"
    assert parser.parse_args(["--quantize-kernels", "gemlite"]).quantize_kernels == "gemlite"


needs_gemlite = pytest.mark.skipif(not torch.cuda.is_available(), reason="gemlite's kernels need a GPU")


@needs_gemlite
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_gemlite_llm_matches_torchao(mode):
    """Every quantized Linear (the head too) is repacked; logits match torchao's, and so does the greedy token
    wherever torchao's top two logits are further apart than the two paths' largest difference."""
    pytest.importorskip("gemlite")
    torchao_llm = quantized_llm(mode, "cuda", torch.bfloat16)
    ids = torch.randint(2, 64, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = torchao_llm(ids).logits.float()
        want_one = torchao_llm(ids[:1, :1]).logits.float()  # one row: the GEMV kernels (split-K, atomic adds)
    linears = sum(isinstance(m, torch.nn.Linear) for m in torchao_llm.modules())
    assert route_through_gemlite(torchao_llm) == linears  # 7 per block x 2 + the head
    assert not any(isinstance(m, torch.nn.Linear) for m in torchao_llm.modules())
    with torch.no_grad():
        got_one = torchao_llm(ids[:1, :1]).logits.float()  # gemlite's first call at one row: autotuned on the way
        got = torchao_llm(ids).logits.float()
    torch.testing.assert_close(got_one, want_one, rtol=2e-2, atol=2e-2 * want_one.abs().max().item())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (got - want).abs().max()
    assert clear.float().mean() > 0.5  # most positions are decided, so the check below means something
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_tuned_settings_are_read_at_start_and_saved_at_exit(monkeypatch, tmp_path):
    """gemlite tunes each new shape on first use (seconds each): what one run tuned is there for the next."""
    from minigpt4qwen.model import gemlite_layers

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = gemlite_layers.tuned_settings_file()
    assert path.parent == tmp_path / "minigpt4qwen" / "gemlite" and path.suffix == ".json"
    path.parent.mkdir(parents=True)
    path.write_text('{"GEMV": {"old": 1}}')
    tuned: dict = {}

    class FakeLinear:
        @staticmethod
        def load_config(filename, print_error=True):
            tuned.update(json.loads(Path(filename).read_text()))
            return True

        @staticmethod
        def cache_config(filename):
            Path(filename).write_text(json.dumps({**tuned, "GEMM": {"new": 2}}))

    at_exit = []
    monkeypatch.setattr(gemlite_layers.atexit, "register", at_exit.append)
    gemlite_layers._keep_tuned_settings(types.SimpleNamespace(core=types.SimpleNamespace(GemLiteLinear=FakeLinear)))
    assert tuned == {"GEMV": {"old": 1}}
    at_exit[0]()
    assert json.loads(path.read_text()) == {"GEMV": {"old": 1}, "GEMM": {"new": 2}}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_each_replaced_layer_is_freed_before_the_next_is_repacked(monkeypatch):
    """The GPU must hold one layer in both forms at a time, not the whole LLM: a replaced Linear (its torchao weight)
    is gone, without a garbage collection, by the time the next one is repacked."""
    import weakref

    from minigpt4qwen.model import gemlite_layers

    llm = make_tiny_model().language_model
    replaced: list[weakref.ref] = []

    def fake_to_gemlite(linear):
        assert all(ref() is None for ref in replaced), "an earlier layer is still alive"
        replaced.append(weakref.ref(linear))
        return torch.nn.Identity()

    monkeypatch.setattr(gemlite_layers, "import_gemlite", lambda: None)
    monkeypatch.setattr(gemlite_layers, "to_gemlite", fake_to_gemlite)
    count = sum(isinstance(m, torch.nn.Linear) for m in llm.modules())
    assert route_through_gemlite(llm) == count > 2
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.modules())
