"""The embedded demo: its data need the image to be answered, bad options are clear errors, and a shortened run
writes a model directory that the chat, generate and export commands load, the same on every run of a seed."""

from __future__ import annotations

import argparse
import json
import shlex
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from minigpt4qwen.cli.main import main
from minigpt4qwen.demo import run, shapes
from minigpt4qwen.demo.evaluate import ANSWER_SETTINGS
from minigpt4qwen.demo.recipe import Recipe
from minigpt4qwen.demo.run import train_and_export
from minigpt4qwen.inference.engine import IMAGE_PROMPT

# A few seconds' run: every step of the demo, none of its accuracy.
SHORT = Recipe(steps=4, batch_size=8, train_images=8, heldout_images=4, width=32, num_queries=4)


def _read_scene(path) -> tuple[str, int]:
    """Colour and count read back from the pixels: the answers must be recoverable from the picture alone."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    ink = pixels.max(axis=2) - pixels.min(axis=2) > 60  # the background is grey; shapes are saturated
    mean = pixels[ink].mean(axis=0)
    colour = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c][0]) - mean).sum())
    half = ink.shape[0] // 2
    quadrants = [ink[:half, :half], ink[:half, half:], ink[half:, :half], ink[half:, half:]]
    return colour, sum(bool(q.any()) for q in quadrants)


def test_answers_are_determined_by_the_image(tmp_path):
    train, heldout = shapes.generate(tmp_path, train_images=60, heldout_images=10, questions_per_image=6)
    records = json.loads(train.read_text(encoding="utf-8"))
    answers_per_question = defaultdict(set)
    for record in records:
        answers_per_question[record["instruction"]].add(record["output"])
        colour, count = _read_scene(tmp_path / "images" / record["image"])
        scene = shapes.Scene(colour, "circle", count)
        if record["kind"] in ("colour", "count"):
            assert record["output"] == shapes.answer(scene, record["kind"], record["language"]), record
        # The image is wrapped as the chat front ends wrap it, so the trained model meets the prompts it learned.
        assert record["instruction"] == IMAGE_PROMPT + shapes.QUESTIONS[record["kind"], record["language"]]
    # Every question text gets several answers: the text alone cannot tell.
    assert len(answers_per_question) == len(shapes.QUESTIONS)
    assert all(len(answers) >= 2 for answers in answers_per_question.values())
    held = json.loads(heldout.read_text(encoding="utf-8"))
    assert {r["image"] for r in held}.isdisjoint({r["image"] for r in records})
    assert len(held) == 10 * len(shapes.QUESTIONS)  # every question about every held-out picture


@pytest.mark.parametrize(("argv", "option"), [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--train-images", "0"], "--train-images"),
    (["--train-images", "-1"], "--train-images"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
])
def test_nonsense_options_are_clear_errors(argv, option, tmp_path, capsys):
    # Valid small values first (the option under test overrides one), so a missed check costs seconds, not minutes.
    argv = ["--steps", "2", "--train-images", "16", *argv]
    args = argparse.Namespace(output_dir=str(tmp_path), seed=0, threads=None, progress_bar=False)
    for name, value in zip(argv[::2], argv[1::2], strict=True):
        setattr(args, name[2:].replace("-", "_"), int(value))
    with pytest.raises(ValueError, match=f"^{option} must be"):
        run(args)
    assert main(["demo", "--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} must be") and "not " in err
    assert not (tmp_path / "data").exists()  # refused before anything was drawn or trained


def test_short_demo_writes_a_model_directory_the_commands_load(tmp_path, capsys):
    result = train_and_export(SHORT, tmp_path / "demo", seed=0, progress_bar=False)
    out = capsys.readouterr().out
    assert result.model_dir == tmp_path / "demo" / "model"
    assert "held-out exact-match accuracy" in out and "overall" in out and "chance" in out
    assert sum(result.scores.asked.values()) == 4 * len(shapes.QUESTIONS)
    # The demo's last lines: the reloaded directory's answer, then the command that asks it again.
    demo_reply = next(line for line in out.splitlines() if line.strip().startswith("A:")).split("A:", 1)[1]
    demo_reply = demo_reply.split("(truth:")[0].strip()
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:4] == ["minigpt4qwen", "chat", "--model-dir", str(result.model_dir)]
    assert command[4] == "--image" and command[6] == "--query" and len(command) == 8
    picture, query = command[5], command[7]
    assert query in shapes.QUESTIONS.values()

    assert main([*command[1:], "--max-new-tokens", str(ANSWER_SETTINGS.max_new_tokens)]) == 0
    assert capsys.readouterr().out.strip() == demo_reply  # the chat command meets the same model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": picture, "query": query}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["generate", str(prompts), str(tmp_path / "answers.jsonl"), "--model-dir", str(result.model_dir),
                 "--max-new-tokens", str(ANSWER_SETTINGS.max_new_tokens)]) == 0
    assert json.loads((tmp_path / "answers.jsonl").read_text(encoding="utf-8"))["answer"] == demo_reply

    assert main(["export", "--model-dir", str(result.model_dir), str(tmp_path / "again")]) == 0
    original = load_file(result.model_dir / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == again.keys() and all(original[k].equal(again[k]) for k in original)


def test_a_seed_gives_the_same_run_and_another_seed_another(tmp_path, capsys):
    first = train_and_export(SHORT, tmp_path / "a", seed=3, progress_bar=False)
    second = train_and_export(SHORT, tmp_path / "b", seed=3, progress_bar=False)
    other = train_and_export(SHORT, tmp_path / "c", seed=4, progress_bar=False)
    weights = [load_file(r.model_dir / "model.safetensors") for r in (first, second, other)]
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    assert first.scores == second.scores
    assert not all(weights[0][k].equal(weights[2][k]) for k in weights[0])
    data = [(tmp_path / run_dir / "data" / "train.json").read_bytes() for run_dir in ("a", "b")]
    assert data[0] == data[1]
