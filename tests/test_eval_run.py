"""`minigpt4qwen eval` end to end on the tiny model through the generation scheduler: answers equal chat answers,
a killed run resumes to the same results file, bad images and failed generations are skipped and counted, the CLI
and `eval compare`."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from minigpt4qwen.checkpoint.export import export_hf
from minigpt4qwen.cli.eval_command import DATA_HELP
from minigpt4qwen.cli.main import main
from minigpt4qwen.evaluation import mme
from minigpt4qwen.evaluation.answering import SchedulerAnswerer
from minigpt4qwen.evaluation.benchmarks import BENCHMARKS
from minigpt4qwen.evaluation.questions import Question
from minigpt4qwen.evaluation.report import markdown
from minigpt4qwen.evaluation.runner import PREDICTIONS, evaluate, predict
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.frontends.prompt_records import Prompt, prompt_ids
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT
from tests.conftest import make_tiny_chat_model

COLOURS = ("red", "green", "blue", "white", "black", "yellow")
TEMPLATE = "what colour is the {question}"
SETTINGS = {"prompt_template": TEMPLATE, "system_prompt": DEFAULT_SYSTEM_PROMPT, "max_new_tokens": 4,
            "decoding": "greedy"}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=2, image_std=0.5)


@pytest.fixture(scope="module")
def scheduler(model_and_tokenizer):
    """Fewer slots than questions in a batch, so questions wait for a slot and join while others decode."""
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=3, capacity=128)
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="module")
def mme_dir(tmp_path_factory):
    """An MME-layout set: 12 images in two subtasks (24 questions), one image undecodable."""
    root = tmp_path_factory.mktemp("mme") / "MME_Benchmark_release_version"
    for subtask, count in (("color", 7), ("code_reasoning", 5)):
        (root / subtask).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (30, 30), COLOURS[i % len(COLOURS)]).save(root / subtask / f"{i}.png")
            (root / subtask / f"{i}.txt").write_text(f"shape\tYes\nsquare {i}\tNo\n")
    (root / "color" / "3.png").write_bytes(b"\x89PNG truncated")
    return root


class Interrupted(Exception):
    pass


class StopAfter:
    """Answers `calls` batches, then dies as a killed process would (mid-run, nothing more written)."""

    def __init__(self, answerer, calls):
        self.answerer, self.calls, self.image_size = answerer, calls, answerer.image_size

    def answer(self, requests):
        if self.calls == 0:
            raise Interrupted
        self.calls -= 1
        return self.answerer.answer(requests)


def _evaluate(answerer, mme_dir, out):
    data = mme.read(mme_dir)
    return evaluate(BENCHMARKS["mme"], data, str(mme_dir), out, answerer, template=TEMPLATE, settings=SETTINGS,
                    model={"model_dir": "tiny"}, batch_size=4, progress=False)


def test_answers_are_the_chat_answers_and_a_killed_run_resumes_to_the_same_results(model_and_tokenizer, scheduler,
                                                                                  mme_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    answerer = SchedulerAnswerer(scheduler, max_new_tokens=4)
    results, made = _evaluate(answerer, mme_dir, tmp_path / "straight")
    assert made.answered_now == 22 and results["questions"] == {"total": 24, "scored": 22, "skipped": 2}
    assert [(s["row"], s["kind"]) for s in results["skipped"]] == [(0, "corrupt_image"), (1, "corrupt_image")]
    lines = [json.loads(line) for line in (tmp_path / "straight" / PREDICTIONS).read_text().splitlines()]
    session = ChatSession(model, tokenizer)
    session.add_image(mme_dir / "code_reasoning" / "1.png")
    first = next(line for line in lines if line["key"] == "code_reasoning/1.png/1")
    assert first["prompt"] == "what colour is the square 1"
    assert first["answer"] == session.ask("what colour is the square 1", GenerationSettings(max_new_tokens=4))
    assert first["parsed"] == mme.parse(None, first["answer"])
    assert len({line["answer"] for line in lines}) >= 3  # answers depend on the image: the check means something

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _evaluate(StopAfter(answerer, calls=2), mme_dir, out)
    with open(out / PREDICTIONS, "a") as f:
        f.write('{"key": "color/5.png/0", "ans')  # a line torn by the kill
    assert not (out / "results.json").exists()
    resumed, made = _evaluate(answerer, mme_dir, out)
    # 6 answered before the kill (batch 2 holds the bad image); its batch is asked again whole, then the rest
    assert made.answered_now == 2 + 16
    assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()
    assert (out / "results.md").read_bytes() == (tmp_path / "straight" / "results.md").read_bytes()
    _, again = _evaluate(answerer, mme_dir, out)  # a finished run asks again only the batch with the bad image
    assert again.answered_now == 2

    with pytest.raises(ValueError, match="prompt_template"):
        evaluate(BENCHMARKS["mme"], mme.read(mme_dir), str(mme_dir), out, answerer, template="{question}",
                 settings={**SETTINGS, "prompt_template": "{question}"}, model={"model_dir": "tiny"}, progress=False)


def test_two_questions_with_one_key_are_refused(mme_dir, tmp_path):
    # Readers drop repeated keys; questions built otherwise must not share answers either.
    questions = [Question(key="k", image=mme_dir / "color" / "0.png", fields={"question": q}, gold={},
                          where=("set.jsonl", row)) for row, q in enumerate(("a", "b"))]
    with pytest.raises(ValueError, match=r"set\.jsonl: record 1: .*question key 'k' repeats that of set\.jsonl: "
                                         r"record 0"):
        predict(questions, SimpleNamespace(image_size=8, answer=lambda requests: ["yes"] * len(requests)),
                "{question}", tmp_path / PREDICTIONS, parse=mme.parse, progress=False)


def test_every_benchmark_has_a_subcommand():
    assert set(DATA_HELP) == set(BENCHMARKS)


def test_eval_subcommand_and_compare(model_and_tokenizer, scheduler, mme_dir, tmp_path, capsys):
    export_hf(*model_and_tokenizer, tmp_path / "model")
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "minigpt4qwen.cli.main", "eval", "mme", "--data", str(mme_dir), "--model-dir",
               str(tmp_path / "model"), "--output-dir", str(out), "--slots", "3", "--max-new-tokens", "4",
               "--prompt", TEMPLATE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mme: 100%" in done.stderr and "24/24" in done.stderr and "q/s" in done.stderr  # the progress bar
    assert "scored 22 of 24 questions (2 skipped for bad data)" in done.stdout
    cli = json.loads((out / "results.json").read_text())
    assert cli["settings"]["prompt_template"] == TEMPLATE and cli["model"]["model_dir"] == str(tmp_path / "model")
    api, _ = _evaluate(SchedulerAnswerer(scheduler, max_new_tokens=4), mme_dir, tmp_path / "api")
    assert cli["table"] == api["table"] and cli["summary"] == api["summary"]

    assert main(["eval", "compare", str(tmp_path / "api" / "results.json"), str(out / "results.json")]) == 0
    assert "| summary | perception |" in capsys.readouterr().out


def test_failed_generations_are_skipped_and_asked_again_by_a_rerun(model_and_tokenizer, scheduler, mme_dir, tmp_path,
                                                                   monkeypatch):
    model, tokenizer = model_and_tokenizer
    answerer = SchedulerAnswerer(scheduler, max_new_tokens=4)
    straight, _ = _evaluate(answerer, mme_dir, tmp_path / "straight")
    # Every "square N" question's prefill runs out of memory (their prompts are one token longer than "shape"'s).
    doomed = len(prompt_ids(model, tokenizer, Prompt(0, 0, "what colour is the square 1", images=("image",))))
    prefill = scheduler.decoder.launch_prefill

    def prefill_that_runs_out_of_memory(chunks, sample):
        if any(len(chunk.embeds) == doomed for chunk in chunks):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return prefill(chunks, sample)

    monkeypatch.setattr(scheduler.decoder, "launch_prefill", prefill_that_runs_out_of_memory)
    out = tmp_path / "failed"
    results, made = _evaluate(answerer, mme_dir, out)
    assert made.answered_now == 11 and results["questions"] == {"total": 24, "scored": 11, "skipped": 13}
    failed = [s for s in results["skipped"] if s["kind"] == "generation_failed"]
    assert len(failed) == 11 and all("OutOfMemoryError: CUDA out of memory (test)" in s["detail"] for s in failed)
    assert "scored 11 of 24 questions (13 skipped for bad data or failed generation)" in markdown(results)
    monkeypatch.undo()
    rerun, made = _evaluate(answerer, mme_dir, out)  # the batches missing answers are asked again
    assert made.answered_now == 22 and rerun["questions"] == straight["questions"]
    assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()


def test_the_run_record_is_checked_by_name_and_bad_options_fail_before_the_model_loads(mme_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    from minigpt4qwen.evaluation.report import load_results
    from minigpt4qwen.evaluation.runner import PREDICTIONS, RUN, check_run

    check_run(tmp_path, {"benchmark": "mme", "settings": {"batch_size": 4}})
    assert not list(tmp_path.glob(".*partial"))  # written whole, then renamed into place
    (tmp_path / PREDICTIONS).write_text("")
    with pytest.raises(ValueError, match="batch_size"):  # other batches would ask answered questions again
        check_run(tmp_path, {"benchmark": "mme", "settings": {"batch_size": 3}})
    (tmp_path / RUN).write_text('{"benchmark": "mm')  # a kill mid-write in an older version
    with pytest.raises(ValueError, match=r"run\.json: not JSON.*delete it"):
        check_run(tmp_path, {"benchmark": "mme"})
    (tmp_path / "partial.json").write_text(json.dumps({"benchmark": "mme", "summary": {}, "table": []}))
    with pytest.raises(ValueError, match="not a results.json"):  # compare reads model and questions too
        load_results(tmp_path / "partial.json")

    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("minigpt4qwen.inference.loading.load_for_inference", no_model)
    for option, message in ((["--batch-size", "0"], "must be >= 1"), (["--max-new-tokens", "0"], "must be >= 1"),
                            (["--prompt", " "], "is empty")):
        assert main(["eval", "mme", "--data", str(mme_dir), "--model-dir", str(tmp_path), *option]) == 2
        assert message in capsys.readouterr().err
