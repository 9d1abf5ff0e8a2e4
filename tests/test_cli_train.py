"""The user's path end to end through the CLI: data check, train (and resume, LoRA), export — on files in the
real formats with tiny shapes (Qwen1 directory, eva_vit_g.pth, blip2_pretrained_flant5xxl.pth)."""

import json

import pytest
import torch
import yaml
from PIL import Image

from minigpt4qwen.checkpoint.native import read_native_checkpoint
from minigpt4qwen.cli.main import main
from minigpt4qwen.training import state
from tests.test_lavis_checkpoints import QUERIES, tiny_blip2_model, tiny_eva_state_dict
from tests.test_qwen1 import random_qwen1_weights, tiny_config, write_qwen1_dir


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    gen = torch.Generator().manual_seed(0)
    torch.save(tiny_eva_state_dict(gen), root / "eva_vit_g.pth")
    torch.save({"model": tiny_blip2_model(gen)}, root / "blip2_pretrained_flant5xxl.pth")
    qwen = tiny_config(layers=1)
    write_qwen1_dir(root / "Qwen7B-chat", qwen, random_qwen1_weights(qwen), shards=2)
    (root / "images").mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"{i}.png")
        records.append({"image": f"{i}.png", "instruction": "<Img><ImageHere></Img> What colour is it?",
                        "output": f"It is {colour}."})
    records.append({"instruction": "Say hi.", "output": "Hi!"})  # text-only records mix in
    (root / "train.json").write_text(json.dumps(records))
    config = {
        "model": {"llm": str(root / "Qwen7B-chat"), "vision_weights": str(root / "eva_vit_g.pth"),
                  "qformer_weights": str(root / "blip2_pretrained_flant5xxl.pth"), "vision_arch": "tiny",
                  "image_size": 28, "num_query_tokens": QUERIES,
                  "dtypes": {k: "fp32" for k in ("vision_model", "qformer", "query_tokens", "language_projection",
                                                 "language_model")}},
        "data": {"datasets": [{"format": "minigpt4qwen", "annotation": str(root / "train.json"),
                               "image_root": str(root / "images")}], "image_size": 28, "max_txt_len": 96,
                 "num_workers": 0},
        "train": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4, "micro_batch_size": 2, "grad_accum": 1,
                  "precision": "fp32", "save_every_steps": 2, "progress_bar": False, "tensorboard": False,
                  "output_dir": str(root / "run"), "check_memory": False},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    return root


def test_data_check_passes_and_then_names_a_bad_record(project, tmp_path, capsys):
    assert main(["data", "check", str(project / "train.yaml")]) == 0
    bad = json.loads((project / "train.json").read_text())
    bad.append({"image": "missing.png", "instruction": "<Img><ImageHere></Img> ?", "output": "x"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    config = yaml.safe_load((project / "train.yaml").read_text())
    config["data"]["datasets"][0]["annotation"] = str(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    code = main(["data", "check", str(tmp_path / "bad.yaml")])
    out = capsys.readouterr().out
    assert code == 1 and "bad.json" in out and "missing.png" in out and "record 5" in out


def test_train_resume_and_export(project, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(project / "train.yaml"), f"train.output_dir={run}"]
    config = yaml.safe_load((project / "train.yaml").read_text())
    config["data"]["val_datasets"] = config["data"]["datasets"]
    (tmp_path / "with_val.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "with_val.yaml"), f"train.output_dir={run}", "train.max_steps=2",
                 "train.tensorboard=true", "train.eval_every=1"]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    assert any(r.get("kind") == "val" and r["loss"] > 0 for r in records), records
    first = read_native_checkpoint(state.find_latest(run))
    assert set(first) == {"language_projection.weight", "language_projection.bias"}
    assert main(args) == 0  # resume=auto continues from step 2 to 4
    assert state.find_latest(run).name.endswith("00000004")
    ckpt = state.find_latest(run)
    out = tmp_path / "export"
    assert main(["export", str(project / "train.yaml"), str(out), f"model.checkpoint={ckpt}"]) == 0
    weights = read_native_checkpoint(ckpt)
    from minigpt4qwen.checkpoint.export import load_exported

    model, _ = load_exported(out)
    assert torch.equal(model.language_projection.weight, weights["language_projection.weight"])


def test_lora_trains_adapters_only(project, tmp_path):
    run = tmp_path / "lora"
    assert main(["train", str(project / "train.yaml"), f"train.output_dir={run}", "train.max_steps=2",
                 "train.lora.enabled=true", "train.lora.r=2", "train.lora.alpha=4"]) == 0
    ckpt = state.find_latest(run)
    saved = read_native_checkpoint(ckpt)
    assert any("lora_" in k for k in saved) and "language_projection.weight" in saved
    assert not any(k.endswith("q_proj.weight") and "lora" not in k for k in saved)
    # The adapters load back (rebuilt from the checkpoint's description), merge into the LLM, and export.
    out = tmp_path / "lora_export"
    assert main(["export", str(project / "train.yaml"), str(out), f"model.checkpoint={ckpt}"]) == 0
    from minigpt4qwen.checkpoint.assemble import build_model
    from minigpt4qwen.checkpoint.export import load_exported
    from minigpt4qwen.config import load_config
    from minigpt4qwen.training.config import RunConfig

    merged, _ = load_exported(out)
    base, _ = build_model(load_config(project / "train.yaml", [], RunConfig).model)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    lora_a = next(v for k, v in saved.items() if "q_proj.lora_A" in k)
    lora_b = next(v for k, v in saved.items() if "q_proj.lora_B" in k)
    assert lora_b.abs().sum() > 0
    torch.testing.assert_close(merged.state_dict()[q] - base.state_dict()[q], (4 / 2) * lora_b @ lora_a)


def test_a_bad_config_is_one_clear_line(project, capsys):
    assert main(["train", str(project / "train.yaml"), "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    # Settings that would be silently ignored or overridden are refused before anything is built.
    for override, message in [("data.image_size=56", "image_size"), ("train.log_every=0", "log_every"),
                              ("parallel.zero_stage=2", "engine=deepspeed"),
                              ("train.lora.enabled=true", "model.trainable.language_model"),
                              ("parallel.engine=deepspeed", "model.dtypes"),
                              ("model.attn_implementation=flex_attention", "CUDA GPUs only"),
                              ("train.precision=fp16", "set model.dtypes.language_projection=fp32")]:
        extra = ["model.trainable.language_model=true"] if "lora" in override else []
        extra += ["train.precision=bf16", "model.dtypes.language_model=bf16"] if "engine=deepspeed" in override else []
        extra += ["model.dtypes.language_projection=fp16"] if "fp16" in override else []  # a trained part in fp16
        assert main(["train", str(project / "train.yaml"), override, *extra]) == 2, override
        assert message in capsys.readouterr().err, override
