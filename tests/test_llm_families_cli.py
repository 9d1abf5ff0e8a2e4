"""Each newer LLM family end to end through the user's commands, on tiny models with the published chat templates:
`data check`, `train` (labels from the template), `export` -> plain transformers load, `chat --query` and `serve`,
whose prompts are the template's own with the placeholders in place."""

import base64
import io
import json

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from minigpt4qwen.checkpoint.export import load_exported
from minigpt4qwen.cli.main import main
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.openai_api.server import build_app
from minigpt4qwen.text.conversation import IMAGE_MARKER
from minigpt4qwen.training import state
from tests.llm_families import FAMILIES, published_tokenizer_config, write_llm_dir
from tests.test_lavis_checkpoints import QUERIES, tiny_blip2_model, tiny_eva_state_dict

PLACEHOLDER = {"Qwen2.5-7B-Instruct": "<|image_pad|>", "Qwen3-8B": "<|image_pad|>",
               "Llama-3.1-8B-Instruct": "<|reserved_special_token_0|>"}
QUESTION = "What colour is it?"
FP32 = {k: "fp32" for k in ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")}


@pytest.fixture(scope="module", params=FAMILIES)
def project(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name.replace(".", "_"))
    gen = torch.Generator().manual_seed(0)
    torch.save(tiny_eva_state_dict(gen), root / "eva_vit_g.pth")
    torch.save({"model": tiny_blip2_model(gen)}, root / "blip2_pretrained_flant5xxl.pth")
    write_llm_dir(name, root / "llm")
    (root / "images").mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"{i}.png")
        records.append({"image": f"{i}.png", "instruction": f"<Img><ImageHere></Img> {QUESTION}",
                        "output": f"It is {colour}. "})  # Llama's template trims the trailing space
    (root / "train.json").write_text(json.dumps(records))
    config = {
        "model": {"llm": str(root / "llm"), "vision_weights": str(root / "eva_vit_g.pth"),
                  "qformer_weights": str(root / "blip2_pretrained_flant5xxl.pth"), "vision_arch": "tiny",
                  "image_size": 28, "num_query_tokens": QUERIES, "dtypes": FP32},
        "data": {"datasets": [{"format": "minigpt4qwen", "annotation": str(root / "train.json"),
                               "image_root": str(root / "images")}], "image_size": 28, "max_txt_len": 512,
                 "num_workers": 0, "chat_format": "template"},
        "train": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1,
                  "precision": "fp32", "save_every_steps": 2, "progress_bar": False, "tensorboard": False,
                  "output_dir": str(root / "run"), "check_memory": False},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "check", str(root / "train.yaml"), "--no-images"]) == 0
    assert main(["train", str(root / "train.yaml")]) == 0
    checkpoint = state.find_latest(root / "run")
    assert main(["export", str(root / "train.yaml"), str(root / "export"), f"model.checkpoint={checkpoint}"]) == 0
    return name, root


def _data_url(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_export_loads_in_plain_transformers_with_the_family_template(project):
    name, root = project
    ours, tokenizer = load_exported(root / "export")
    plain = Blip2ForConditionalGeneration.from_pretrained(root / "export").eval()
    plain.vision_model.post_layernorm.eps = 1e-5  # the one value Blip2Config cannot hold (see test_export)
    assert type(plain.language_model).__name__ == type(ours.language_model).__name__
    assert plain.config.image_token_id == ours.image_token_id == tokenizer.convert_tokens_to_ids(PLACEHOLDER[name])
    saved = AutoTokenizer.from_pretrained(root / "export")
    assert saved.chat_template == published_tokenizer_config(name)["chat_template"]
    text = saved.apply_chat_template([{"role": "user", "content": PLACEHOLDER[name] * QUERIES + QUESTION}],
                                     tokenize=True, add_generation_prompt=True)["input_ids"]
    ids = torch.tensor([text])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids, torch.ones_like(ids), pixel_values=pixels).logits
        got = plain(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chat_prompt_is_the_templates_and_chat_answers(project, capsys):
    name, root = project
    model, tokenizer = load_exported(root / "export")
    session = ChatSession(model, tokenizer)
    session.add_image(root / "images" / "0.png")
    ids, features = session.build_prompt(session.with_image_markers(QUESTION))
    messages = [{"role": "system", "content": session.system_prompt},
                {"role": "user", "content": f"<Img>{IMAGE_MARKER}</Img>{QUESTION}".replace(
                    IMAGE_MARKER, PLACEHOLDER[name] * QUERIES)}]
    extra = {"enable_thinking": False} if name.startswith("Qwen3") else {}
    assert ids[0].tolist() == tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                            **extra)["input_ids"]
    assert features.shape[0] == 1
    reply = session.ask(QUESTION, GenerationSettings(max_new_tokens=4))
    capsys.readouterr()
    assert main(["chat", "--model-dir", str(root / "export"), "--cpu-only", "--max-new-tokens", "4",
                 "--image", str(root / "images" / "0.png"), "--query", QUESTION]) == 0
    assert capsys.readouterr().out.strip() == reply


def test_serve_answers_like_the_engine(project):
    name, root = project
    model, tokenizer = load_exported(root / "export")
    session = ChatSession(model, tokenizer)
    session.add_image(root / "images" / "1.png")
    expected = session.ask(QUESTION, GenerationSettings(max_new_tokens=4))
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url("green")}}, {"type": "text", "text": QUESTION}]}]}
    with TestClient(build_app(model, tokenizer, "tiny")) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected
