"""The benchmarks `minigpt4qwen eval` knows: how each is read, parsed, scored and prompted by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minigpt4qwen.evaluation import mmbench, mme, pope, seed, vqa
from minigpt4qwen.evaluation.questions import BenchmarkData, Question, Scores

MMBENCH_TEMPLATE = "{hint_line}Question: {question}\nOptions:\n{options}\nPlease select the correct answer from the " \
                   "options above."
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
        name: as given on the command line.
        read: (data path, image root or None) -> the questions.
        parse: (question, raw answer) -> what scoring reads from it (a label, an option letter, ...), or None.
        score: (questions, raw answers by key) -> the scores.
        fields: the fields its prompt template may use.
        template: the default prompt template (VLMEvalKit's for MMBench, LLaVA-1.5's for POPE, SEED-Bench and
            VQA; MME's questions already say "Please answer yes or no.").
        max_new_tokens: the default answer length limit.
    """

    name: str
    read: Callable[[Path, Path | None], BenchmarkData]
    parse: Callable[[Question, str], str | None]
    score: Callable[[list[Question], dict[str, str]], Scores]
    fields: tuple[str, ...]
    template: str
    max_new_tokens: int


BENCHMARKS = {b.name: b for b in (
    Benchmark("mme", mme.read, mme.parse, mme.score, mme.FIELDS, "{question}", 16),
    Benchmark("mmbench", mmbench.read, mmbench.parse, mmbench.score, mmbench.FIELDS, MMBENCH_TEMPLATE, 32),
    Benchmark("mmbench-cn", mmbench.read, mmbench.parse, mmbench.score, mmbench.FIELDS, MMBENCH_TEMPLATE, 32),
    Benchmark("pope", pope.read, pope.parse, pope.score, pope.FIELDS, "{question}" + SHORT_ANSWER, 16),
    Benchmark("seed-bench", seed.read, seed.parse, seed.score, seed.FIELDS,
              "{question}\n{options}\nAnswer with the option's letter from the given choices directly.", 16),
    Benchmark("vqa", partial(vqa.read, answers_key="answers"), vqa.parse_vqa, vqa.score_vqa, vqa.VQA_FIELDS,
              "{question}" + SHORT_ANSWER, 32),
    Benchmark("caption", partial(vqa.read, answers_key="captions"), vqa.parse_caption, vqa.score_caption,
              vqa.CAPTION_FIELDS, "Describe the image in one sentence.", 64),
)}
