"""A synthetic visual question-answering set: pictures of 1-3 shapes of one colour, questions in English and
Chinese about the colour, the shape and the count. The answer is a function of the picture alone (the text of a
question never hints at it), so accuracy above chance measures that the model reads the image.

Written in the original project's JSON format ({"image", "instruction", "output"}) beside an image folder, with
the image wrapped as the chat front ends wrap it (`<Img><ImageHere></Img>` right before the question), so a
model trained on it answers `minigpt4qwen chat --image PICTURE --query QUESTION` as it was taught.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from minigpt4qwen.data.formats import IMAGE_WRAP

COLOURS = {"red": ((220, 30, 30), "红色"), "green": ((30, 160, 40), "绿色"), "blue": ((30, 60, 220), "蓝色"),
           "yellow": ((230, 200, 20), "黄色")}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COUNTS = {1: "一个", 2: "两个", 3: "三个"}
KINDS = ("colour", "shape", "count")
# (question kind, language) -> question text, as a user would type it.
QUESTIONS = {
    ("colour", "en"): "What colour is the shape?",
    ("colour", "zh"): "图中的形状是什么颜色？",
    ("shape", "en"): "What shape is it?",
    ("shape", "zh"): "这是什么形状？",
    ("count", "en"): "How many shapes are there?",
    ("count", "zh"): "图中有几个形状？",
}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / len(COUNTS)}
# Each shape's side as a fraction of its quadrant's side, and how far its centre strays from the quadrant's, in
# pixels: large, near-centred shapes make the demo's from-scratch vision tower learn the shape reliably within its
# CPU budget (measured: sides of 0.55-0.85 anywhere in the quadrant left the shape at 40-60% on most seeds).
SIDE_RANGE = (0.7, 0.95)
JITTER = 1


@dataclass(frozen=True)
class Scene:
    """What a picture shows."""

    colour: str
    shape: str
    count: int


def answer(scene: Scene, kind: str, language: str) -> str:
    """The one correct answer to a question `kind` in `language` about `scene`."""
    if kind == "colour":
        return scene.colour if language == "en" else COLOURS[scene.colour][1]
    if kind == "shape":
        return scene.shape if language == "en" else SHAPES[scene.shape]
    return str(scene.count) if language == "en" else COUNTS[scene.count]


def draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Renders `scene`: each shape in its own quadrant, with a random size, near the quadrant's centre."""
    grey = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    cell = size // 2
    fill = COLOURS[scene.colour][0]
    for quadrant in rng.sample(range(4), scene.count):
        side = rng.randint(round(cell * SIDE_RANGE[0]), round(cell * SIDE_RANGE[1]))
        free = cell - side  # the shape stays inside its quadrant
        x0 = (quadrant % 2) * cell + min(max(free // 2 + rng.randint(-JITTER, JITTER), 0), free)
        y0 = (quadrant // 2) * cell + min(max(free // 2 + rng.randint(-JITTER, JITTER), 0), free)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if scene.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif scene.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return image


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), rng.choice(list(COUNTS)))


def question(kind: str, language: str) -> str:
    """The user turn of a question: the image, then the question text."""
    return IMAGE_WRAP + QUESTIONS[kind, language]


def write_split(root: Path, name: str, num_images: int, questions_per_image: int, size: int,
                rng: random.Random) -> Path:
    """Draws `num_images` pictures into root/images and writes root/{name}.json: one single-turn record per
    question, `questions_per_image` distinct questions (of the six) per picture.

    Returns:
        The annotation file.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_images):
        scene = random_scene(rng)
        file = f"{name}_{i:05d}.png"
        draw(scene, size, rng).save(root / "images" / file)
        for kind, language in rng.sample(list(QUESTIONS), questions_per_image):
            records.append({"image": file, "instruction": question(kind, language),
                            "output": answer(scene, kind, language), "kind": kind, "language": language})
    annotation = root / f"{name}.json"
    annotation.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return annotation


def generate(root: str | Path, *, train_images: int = 1200, heldout_images: int = 150, size: int = 32,
             questions_per_image: int = 2, heldout_questions_per_image: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """Writes the train and held-out splits (disjoint pictures) under `root`.

    Args:
        root: output folder (created); images go to root/images.
        train_images, heldout_images: pictures per split.
        size: picture side in pixels.
        questions_per_image, heldout_questions_per_image: distinct questions asked about each picture (1-6).
        seed: makes the set reproducible.

    Returns:
        (train annotation file, held-out annotation file).
    """
    rng = random.Random(seed)
    root = Path(root)
    train = write_split(root, "train", train_images, questions_per_image, size, rng)
    heldout = write_split(root, "heldout", heldout_images, heldout_questions_per_image, size, rng)
    return train, heldout


def vocabulary() -> list[str]:
    """Every text the set uses (for building the demo's word-level tokenizer)."""
    answers = [*COLOURS, *SHAPES, *(v[1] for v in COLOURS.values()), *SHAPES.values(), *COUNTS.values(),
               *(str(c) for c in COUNTS)]
    return [IMAGE_WRAP, *QUESTIONS.values(), *answers]
