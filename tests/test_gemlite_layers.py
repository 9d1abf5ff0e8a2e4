"""gemlite's kernels over our quantized layers (`model/gemlite_layers.py`, `--quantize-kernels gemlite`).

On the CPU: the refusals (no quantized LLM, no GPU, no gemlite). On a GPU with gemlite: each repacked layer computes
what the torchao layer it came from computes, and a tiny LLM's logits and greedy tokens stay those of torchao's.

Tolerance: int8 keeps the same int8 values and scales, so the two differ only by how the kernels sum in fp32 and round
to bf16 (rtol 2e-2 on bf16 outputs). int4's zero point is stored as `zero - 8 * scale` in bf16 (torchao keeps
`zero`): up to ~1/60 of a quantization step per weight, well inside the same tolerance.
"""

import argparse
import sys

import pytest
import torch

pytest.importorskip("torchao")

from minigpt4qwen.inference.loading import _route_through_gemlite  # noqa: E402
from minigpt4qwen.model.gemlite_layers import import_gemlite, route_through_gemlite  # noqa: E402
from minigpt4qwen.model.quantization import quantize_language_model  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.test_quantized_fusion import quantized_llm  # noqa: E402


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
    linears = sum(isinstance(m, torch.nn.Linear) for m in torchao_llm.modules())
    assert route_through_gemlite(torchao_llm) == linears  # 7 per block x 2 + the head
    assert not any(isinstance(m, torch.nn.Linear) for m in torchao_llm.modules())
    with torch.no_grad():
        got = torchao_llm(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (got - want).abs().max()
    assert clear.float().mean() > 0.5  # most positions are decided, so the check below means something
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
