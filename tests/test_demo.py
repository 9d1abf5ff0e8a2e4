"""The embedded demo: its data need the image to be answered, and a shortened run exercises the whole pipeline."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from PIL import Image

from minigpt4qwen.demo import run, shapes
from minigpt4qwen.training import state


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
    # Every question text gets several answers: the text alone cannot tell.
    assert len(answers_per_question) == len(shapes.QUESTIONS)
    assert all(len(answers) >= 2 for answers in answers_per_question.values())
    held = {r["image"] for r in json.loads(heldout.read_text(encoding="utf-8"))}
    assert held.isdisjoint({r["image"] for r in records})


def test_short_demo_runs_the_whole_pipeline(tmp_path, capsys):
    args = argparse.Namespace(output_dir=str(tmp_path), steps=6, train_images=64, progress_bar=False)
    code = run(args)
    out = capsys.readouterr().out
    assert code in (0, 1)  # six steps do not have to beat chance; the full demo does
    assert "held-out exact-match accuracy" in out and "chance" in out and "A:" in out
    checkpoint = state.find_latest(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "checkpoint-00000006"
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
