"""Qwen1 (Qwen-7B/14B-Chat remote-code format) -> Qwen2ForCausalLM, and `load_llm`: key coverage of the real
checkpoints, logit parity against the Qwen1 math in plain torch, streaming loads, errors, peak memory, placeholders.
Run: `python -m pytest tests/test_qwen1.py -q`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from minigpt4qwen.checkpoint.keymap import CheckpointError, check_state_dict
from minigpt4qwen.checkpoint.llm import llm_config_from_dir, load_llm, placeholder_token_id
from minigpt4qwen.checkpoint.qwen1 import is_qwen1_dir, load_qwen1_dir, qwen1_keymap, qwen2_config_from_qwen1
from tests.reference import MANIFESTS, QWEN7B_DIR

REAL_CONFIG = json.loads((QWEN7B_DIR / "config.json").read_text())
TRAP = "open(__file__ + '.executed', 'w').close()\nraise RuntimeError('Qwen1 remote code must never run')\n"
REMOTE_CODE = ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py")
QWEN14B = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "kv_channels": 128,
           "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048}  # 14B-Chat: the published config.json
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # all the specials of the original Qwen2


@pytest.mark.parametrize("name", ["qwen7b_chat", "qwen14b_chat"])
def test_real_checkpoint_keys_cover_qwen2_exactly(name: str) -> None:
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    shapes = {k: v["shape"] for k, v in manifest["state_dict"].items()}
    real_7b_keys = set(json.loads((QWEN7B_DIR / "model.safetensors.index.json").read_text())["weight_map"])
    assert real_7b_keys == set(shapes) if "7b" in name else QWEN14B.items() <= manifest["config"].items()
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config_from_qwen1(REAL_CONFIG | (QWEN14B if "14b" in name else {})))
    converted = qwen1_keymap().convert({k: torch.empty(s, device="meta") for k, s in shapes.items()}, name)
    assert check_state_dict(model, converted, name) == []
    num_params, c = sum(p.numel() for p in model.parameters()), model.config
    assert num_params == manifest["num_params"] == {"qwen7b_chat": 7_721_324_544, "qwen14b_chat": 14_167_290_880}[name]
    expected = {"qwen7b_chat": (11008, 151936, 8192, 8192), "qwen14b_chat": (13696, 152064, 2048, 2048)}[name]
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.seq_length) == expected
    assert c.num_key_value_heads == c.num_attention_heads and not c.tie_word_embeddings and c.pad_token_id == 151643
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.use_dynamic_ntk and c.use_logn_attn


def test_early_naming_converts_like_late_naming_and_inexpressible_configs_are_refused() -> None:
    names = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
             "intermediate_size": "ffn_hidden_size", "vocab_size": "padded_vocab_size"}
    early = {names.get(k, k): v for k, v in REAL_CONFIG.items()} | {"vocab_size": 151851}  # = len(tokenizer)
    assert qwen2_config_from_qwen1(early).to_dict() == qwen2_config_from_qwen1(REAL_CONFIG).to_dict()
    for bad in ({"rotary_pct": 0.5}, {"kv_channels": 32}, {"no_bias": False}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            qwen2_config_from_qwen1(REAL_CONFIG | bad)


def tiny_config(vocab: int = 151936, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 176) -> dict:
    """The real Qwen1 config.json, shrunk; `ffn` is Qwen1's intermediate_size (both SwiGLU branches)."""
    return REAL_CONFIG | {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                          "num_attention_heads": heads, "kv_channels": hidden // heads, "intermediate_size": ffn}


def random_qwen1_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every Qwen1 parameter random at a scale that keeps activations O(1) (norm gains and biases too)."""
    v, h, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"] // 2
    layer = {"ln_1.weight": (h,), "attn.c_attn.weight": (3 * h, h), "attn.c_attn.bias": (3 * h,),
             "attn.c_proj.weight": (h, h), "ln_2.weight": (h,), "mlp.w1.weight": (f, h), "mlp.w2.weight": (f, h),
             "mlp.c_proj.weight": (h, f)}
    shapes = {"transformer.wte.weight": (v, h), "transformer.ln_f.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        shapes |= {f"transformer.h.{i}.{k}": shape for k, shape in layer.items()}
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) for k, shape in (shapes | {"lm_head.weight": (v, h)}).items()}
    return {k: t / math.sqrt(t.shape[-1]) if t.dim() == 2 else 0.1 * t + (".ln_" in k) for k, t in sd.items()}


def write_qwen1_dir(directory: Path, config: dict, sd: dict[str, torch.Tensor], shards: int = 3,
                    fmt: str = "safetensors") -> Path:
    """A Qwen1 directory in the published layout: sharded weights + index, qwen.tiktoken, booby-trapped code."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "qwen.tiktoken"):
        (directory / name).symlink_to(QWEN7B_DIR / name)
    for name in REMOTE_CODE:
        (directory / name).write_text(TRAP)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    total, seen, weight_map = sum(t.numel() for t in sd.values()), 0, {}
    for key, tensor in sd.items():  # shards of about equal bytes, in key order, like save_pretrained
        parts[min(shards - 1, seen * shards // total)][key] = tensor
        seen += tensor.numel()
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    for n, part in enumerate(parts):
        name = f"{stem}-{n + 1:05d}-of-{shards:05d}.{fmt}"
        (safetensors.torch.save_file if fmt == "safetensors" else torch.save)(part, directory / name)
        weight_map |= dict.fromkeys(part, name)
    (directory / f"{stem}.{fmt}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def reference_logits(sd: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """Qwen1 `QWenLMHeadModel.forward` for one unpadded sequence [T], written from the Qwen1 key names."""
    h, nh, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_epsilon"]
    hd, t = h // nh, ids.shape[0]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / config["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(t).float(), inv_freq).repeat(1, 2)  # [T, hd] = cat(freqs, freqs)
    cos, sin = angles.cos(), angles.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # [nh, T, hd], Qwen1's rotate-half convention
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["transformer.wte.weight"][ids]  # [T, H]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        qkv = F.linear(rms(x, sd[p + "ln_1.weight"]), sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"])
        q, k, v = (z.view(t, nh, hd).transpose(0, 1) for z in qkv.split(h, dim=-1))  # [nh, T, hd]
        scores = (rope(q) @ rope(k).transpose(-1, -2)) * hd**-0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + F.linear(attn.transpose(0, 1).reshape(t, h), sd[p + "attn.c_proj.weight"])
        y = rms(x, sd[p + "ln_2.weight"])
        mlp = F.linear(y, sd[p + "mlp.w1.weight"]) * F.silu(F.linear(y, sd[p + "mlp.w2.weight"]))
        x = x + F.linear(mlp, sd[p + "mlp.c_proj.weight"])
    return F.linear(rms(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    config = tiny_config()  # the real 151936-row vocabulary, so the real tokenizer's ids are all valid
    sd = random_qwen1_weights(config)
    return write_qwen1_dir(tmp_path_factory.mktemp("qwen1") / "Qwen-tiny-Chat", config, sd), config, sd


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_qwen1_math_with_right_padding(tiny, attn: str) -> None:
    directory, config, sd = tiny
    model = load_qwen1_dir(directory, dtype=torch.float32, attn_implementation=attn)
    assert model.config._attn_implementation == attn and not model.training
    lengths = (12, 7)
    ids = torch.randint(0, 151851, (2, max(lengths)), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    ids[1, lengths[1] :] = 151643  # right padding with <|endoftext|>, as MiniGPT4Qwen's training batches
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        torch.testing.assert_close(logits[row, :n], reference_logits(sd, config, ids[row, :n]), atol=1e-5, rtol=1e-5)


def test_load_llm_greedy_generation_with_and_without_cache(tiny) -> None:
    directory, config, sd = tiny
    model, tokenizer = load_llm(directory, dtype=torch.float32)
    assert placeholder_token_id(tokenizer) == 151646 and len(tokenizer) == 151851
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Describe<|extra_0|>"}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, return_tensors="pt").input_ids
    assert 151646 in prompt[0].tolist() and prompt[0, 0] == 151644
    runs = [model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=c, pad_token_id=151643)
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])
    ids = prompt[0]
    for _ in range(runs[0].shape[1] - prompt.shape[1]):  # the same tokens from the reference math
        ids = torch.cat([ids, reference_logits(sd, config, ids)[-1].argmax().view(1)])
    assert torch.equal(runs[0][0], ids)
    assert not any((directory / f"{name}.executed").exists() for name in REMOTE_CODE)


def test_bin_shards_with_old_buffers_and_single_safetensors_load_the_same(tmp_path: Path) -> None:
    config = tiny_config(vocab=512)
    sd = random_qwen1_weights(config)
    with_buffers = sd | {"transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8), "transformer.h.0.attn.masked_bias":
                         torch.tensor(-1e4), "transformer.h.1.attn.rotary_emb.inv_freq": torch.ones(8)}
    bin_dir = write_qwen1_dir(tmp_path / "bin", config, with_buffers, shards=2, fmt="bin")
    single = write_qwen1_dir(tmp_path / "single", config, sd, shards=1)
    (single / "model-00001-of-00001.safetensors").rename(single / "model.safetensors")
    (single / "model.safetensors.index.json").unlink()
    ids = torch.arange(10).view(1, 10)
    for directory in (bin_dir, single):
        model = load_qwen1_dir(directory, dtype=torch.float32)
        assert model.config.pad_token_id is None  # 151643 is no row of a 512-token embedding
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits[0], reference_logits(sd, config, ids[0]), atol=1e-5, rtol=1e-5)
    assert is_qwen1_dir(single) and llm_config_from_dir(single).intermediate_size == 88


def _small_dir(tmp_path: Path, sd_edit=lambda sd: sd) -> Path:
    config = tiny_config(vocab=512)
    return write_qwen1_dir(tmp_path / "m", config, sd_edit(random_qwen1_weights(config)))


def test_broken_directories_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llm(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_qwen1_dir(tmp_path / "nowhere")
    directory = _small_dir(tmp_path / "a")
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_qwen1_dir(directory)
    directory = _small_dir(tmp_path / "b")
    shard = directory / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors.*truncated"):
        load_qwen1_dir(directory)
    for sub, edit, error in [("c", {"transformer.h.0.attn.extra": "model-00001-of-00003.safetensors"}, "non-Qwen1 key"),
                             ("d", {"lm_head.weight": None}, "lm_head.weight.*not in the index")]:
        directory = _small_dir(tmp_path / sub)  # the index names an unknown key / forgets a key its shard holds
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v for k, v in (index["weight_map"] | edit).items() if v}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=error):
            load_qwen1_dir(directory)


def test_inconsistent_weights_are_refused(tmp_path: Path) -> None:
    directory = _small_dir(tmp_path / "c")  # the same key in two shards
    first = directory / "model-00001-of-00003.safetensors"
    part = safetensors.torch.load_file(first) | {"lm_head.weight": torch.zeros(512, 64)}
    safetensors.torch.save_file(part, first)
    with pytest.raises(CheckpointError, match="model-00001-of-00003.*lm_head.weight.*model-00003-of-00003"):
        load_qwen1_dir(directory)
    directory = _small_dir(tmp_path / "d", lambda sd: {k: v for k, v in sd.items() if k != "transformer.ln_f.weight"})
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_qwen1_dir(directory)
    directory = _small_dir(tmp_path / "e", lambda sd: sd | {"transformer.h.1.mlp.w1.weight": torch.zeros(90, 64)})
    with pytest.raises(CheckpointError, match=r"up_proj.weight: expected \(88, 64\), found \(90, 64\)"):
        load_qwen1_dir(directory)


# Runs in a fresh interpreter: in the test process, memory freed by earlier tests would be reused unseen.
PEAK_SCRIPT = r"""
import json, re, sys, torch
from pathlib import Path
from transformers import Qwen2ForCausalLM
from minigpt4qwen.checkpoint.qwen1 import load_qwen1_dir, qwen2_config_from_qwen1, read_config_json

status = lambda field: int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024
with torch.device("meta"):  # warm-up: transformers' lazy imports are not part of what is measured
    Qwen2ForCausalLM(qwen2_config_from_qwen1(read_config_json(sys.argv[1])))
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
baseline = status("VmRSS")
model = load_qwen1_dir(sys.argv[1], dtype=torch.bfloat16)
size = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = [str(model.lm_head.weight.dtype), str(model.model.rotary_emb.inv_freq.dtype)]
print(json.dumps({"extra": status("VmHWM") - baseline, "size": size, "dtypes": dtypes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_streaming_load_peak_memory_is_about_one_model(tmp_path: Path) -> None:
    config = tiny_config(vocab=4096, hidden=512, layers=12, heads=8, ffn=2816)
    directory = write_qwen1_dir(tmp_path / "big", config, random_qwen1_weights(config), shards=16)  # 175 MB fp32
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(directory)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)  # `-c` puts the cwd (the repo) on sys.path
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    extra, size = result["extra"], result["size"]  # size: ~82 MiB of bf16 parameters; inv_freq stays fp32
    assert result["dtypes"] == ["torch.bfloat16", "torch.float32"]
    # Materialising the model and then copying weights in needs >= 2x; holding the whole fp32 state dict 3x.
    # Streaming needs the model plus about one 11 MB fp32 shard (mapped and copied): ~1.1x.
    assert 0.95 * size < extra < 1.4 * size, f"peak extra RSS {extra / 2**20:.0f} MiB, model {size / 2**20:.0f} MiB"


def _word_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def test_placeholder_for_qwen2_family_tokenizers() -> None:
    qwen25 = _word_tokenizer([*QWEN2_SPECIALS, "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>"])
    assert placeholder_token_id(qwen25) == qwen25.convert_tokens_to_ids("<|image_pad|>") and len(qwen25) == 10
    qwen2 = _word_tokenizer(QWEN2_SPECIALS)
    image = placeholder_token_id(qwen2)  # added as a special token, found again on the next call
    assert image == len(qwen2) - 1 == 6 and placeholder_token_id(qwen2) == image == qwen2("a <image>b").input_ids[1]


def test_load_llm_native_directory(tmp_path: Path) -> None:
    model = Qwen2ForCausalLM(qwen2_config_from_qwen1(tiny_config(vocab=512))).eval()
    model.save_pretrained(tmp_path)
    _word_tokenizer(QWEN2_SPECIALS).save_pretrained(tmp_path)
    loaded, tokenizer = load_llm(tmp_path, dtype=torch.float32)
    assert type(llm_config_from_dir(tmp_path)) is type(loaded.config) is Qwen2Config and len(tokenizer) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.arange(6)[None]).logits, model(torch.arange(6)[None]).logits)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_llm(tmp_path)


def test_a_bin_shard_in_the_pre_zip_format_is_read_whole(tmp_path):
    from minigpt4qwen.checkpoint.shards import read_shard

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # cannot be mmapped
    read = read_shard(tmp_path / "pytorch_model.bin")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
