"""End to end: a model assembled from files in every real format (tiny shapes, real key names) by a ModelConfig."""

from dataclasses import dataclass, field

import pytest
import torch

from minigpt4qwen.checkpoint.assemble import build_model
from minigpt4qwen.checkpoint.keymap import CheckpointError
from minigpt4qwen.checkpoint.native import save_checkpoint
from minigpt4qwen.config import ModelConfig, load_config
from minigpt4qwen.model.parts import PartDtypes
from tests.test_lavis_checkpoints import QUERIES, ref_eva_ln_vision, ref_qformer, tiny_blip2_model, tiny_eva_state_dict
from tests.test_qwen1 import random_qwen1_weights, tiny_config, write_qwen1_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    gen = torch.Generator().manual_seed(0)
    eva, blip2 = tiny_eva_state_dict(gen), tiny_blip2_model(gen)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")
    qwen = tiny_config()
    write_qwen1_dir(root / "Qwen7B-chat", qwen, random_qwen1_weights(qwen))
    proj = {"llm_proj.weight": torch.randn(qwen["hidden_size"], 32, generator=gen) * 0.1,
            "llm_proj.bias": torch.randn(qwen["hidden_size"], generator=gen) * 0.1}
    torch.save(proj, root / "model.pth")  # the original project's projection-only checkpoint
    return root, eva, blip2, proj


def _config(root, **kw) -> ModelConfig:
    base = dict(llm=str(root / "Qwen7B-chat"), vision_weights=str(root / "eva_vit_g.pth"),
                qformer_weights=str(root / "blip2_pretrained_flant5xxl.pth"), checkpoint=str(root / "model.pth"),
                vision_arch="tiny", image_size=28, num_query_tokens=QUERIES, dtypes=PartDtypes.uniform("fp32"))
    return ModelConfig(**{**base, **kw})


def test_assembled_model_matches_the_original_math(files):
    root, eva, blip2, proj = files
    model, tokenizer = build_model(_config(root))
    assert model.image_token_id == tokenizer.convert_tokens_to_ids("<|extra_0|>") == 151646
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ln = {k: blip2[k] for k in ("ln_vision.weight", "ln_vision.bias")}
    image = ref_eva_ln_vision({k: v.float() for k, v in eva.items()}, ln, pixels)
    expected = torch.nn.functional.linear(ref_qformer(blip2, image), proj["llm_proj.weight"], proj["llm_proj.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels), expected, rtol=1e-4, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_projection.weight", "language_projection.bias"}


def test_our_checkpoint_round_trips_through_the_config(files, tmp_path):
    root, *_ = files
    model, _ = build_model(_config(root))
    with torch.no_grad():
        model.language_projection.weight.add_(1.0)
    save_checkpoint(model, tmp_path / "ckpt")
    reloaded, _ = build_model(_config(root, checkpoint=str(tmp_path / "ckpt")))
    assert torch.equal(reloaded.language_projection.weight, model.language_projection.weight)


def test_preset_finds_the_original_cache_layout(files, tmp_path):
    root, *_ = files
    cache = tmp_path / "cache" / "ckpt"
    (cache / "eva").mkdir(parents=True)
    (cache / "blip2").mkdir()
    (cache / "eva" / "eva_vit_g.pth").symlink_to(root / "eva_vit_g.pth")
    (cache / "blip2" / "blip2_pretrained_flant5xxl.pth").symlink_to(root / "blip2_pretrained_flant5xxl.pth")
    (cache / "Qwen7B-chat").symlink_to(root / "Qwen7B-chat")
    cfg = load_config(None, ["model.preset=qwen7b_chat", f"model.cache_root={tmp_path / 'cache'}",
                             "model.vision_arch=tiny", "model.image_size=28", f"model.num_query_tokens={QUERIES}"],
                      _Wrapper).model
    model, _ = build_model(cfg)
    assert model.vision_model.post_layernorm.eps == 1e-5


def test_missing_parts_are_named_with_the_setting_to_fix(files):
    root, *_ = files
    with pytest.raises(CheckpointError, match="qformer.*model.qformer_weights"):
        build_model(_config(root, qformer_weights=None))
    with pytest.raises(FileNotFoundError, match="model.vision_weights"):
        build_model(_config(root, vision_weights=str(root / "nope.pth")))


@dataclass
class _Wrapper:
    model: ModelConfig = field(default_factory=ModelConfig)


def test_inference_refuses_an_untrained_projection(files):
    root, *_ = files
    with pytest.raises(CheckpointError, match="language_projection.*model.checkpoint"):
        build_model(_config(root, checkpoint=None), fresh_projection=False)
    model, _ = build_model(_config(root, checkpoint=None))  # a new training run starts from a random one
    assert model.language_projection.weight.abs().sum() > 0


def test_a_projection_given_in_part_is_an_error_not_a_fresh_start(files, tmp_path):
    root, _, _, proj = files
    torch.save({"llm_proj.weight": proj["llm_proj.weight"]}, tmp_path / "weight_only.pth")  # the bias left out
    with pytest.raises(CheckpointError, match="language_projection.*language_projection.bias"):
        build_model(_config(root, checkpoint=str(tmp_path / "weight_only.pth")))  # its weight kept nothing random
