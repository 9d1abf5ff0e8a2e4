"""`minigpt4qwen chat` as a real process: driven through a pseudo-terminal (pexpect), and in `--query` mode.

The tiny model is exported to a directory and loaded with `--model-dir`. Its output head only favours 图 or 中,
so greedy replies never hit a stop token and stream character by character: long replies can be watched
arriving and then interrupted with Ctrl-C.
"""

import re
import subprocess
import sys

import pexpect
import pytest
import torch
from PIL import Image

from minigpt4qwen.checkpoint.export import export_hf, load_exported
from minigpt4qwen.cli.chat import ChatCLI
from minigpt4qwen.cli.main import main
from minigpt4qwen.inference.engine import ChatSession, GenerationSettings
from minigpt4qwen.inference.prompt_budget import question_tokens
from tests.conftest import make_tiny_chat_model

QUESTION = "what colour is the shape"
USER = "User> "
LEFT, UP = "\x1b[D", "\x1b[A"  # what a terminal sends for the arrow keys
CHAT = [sys.executable, "-m", "minigpt4qwen.cli.main", "chat", "--max-new-tokens", "8"]


def _export_streaming_model(directory):
    model, tokenizer = make_tiny_chat_model(seed=0)
    with torch.no_grad():  # logits: +-10 * h[0] for 图 / 中, 0 for every other token (stop tokens included)
        head = model.language_model.get_output_embeddings().weight
        head.zero_()
        head[tokenizer.convert_tokens_to_ids("图"), 0] = 10.0
        head[tokenizer.convert_tokens_to_ids("中"), 0] = -10.0
    export_hf(model, tokenizer, directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    _export_streaming_model(root / "model")
    Image.new("RGB", (40, 40), "red").save(root / "red image.png")
    Image.new("RGB", (40, 40), "green").save(root / "green.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def scripted(files):
    """A `--query` run, started at once so it loads while the interactive session runs."""
    process = subprocess.Popen([*CHAT, "--model-dir", str(files / "model"), "--query", QUESTION, "--image",
                                str(files / "red image.png")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def expected(files):
    """The engine API's greedy answer to QUESTION about the red image, with the CLI's defaults."""
    model, tokenizer = load_exported(files / "model")
    session = ChatSession(model, tokenizer)
    session.add_image(files / "red image.png")
    return session.ask(QUESTION, GenerationSettings(max_new_tokens=8, seed=42))


@pytest.fixture(scope="module")
def cli(files, scripted):
    """An interactive session taken through the image step; `cli.transcript` is that step's output."""
    child = pexpect.spawn(CHAT[0], [*CHAT[1:], "--model-dir", str(files / "model")], encoding="utf-8",
                          timeout=60, dimensions=(40, 120))
    transcript = []
    for line in [str(files / "missing.png"), str(files / "notes.txt"), "", f"'{files / 'red image.png'}'", ":f"]:
        child.expect_exact(":f to finish")
        transcript.append(child.before)
        child.sendline(line)
    child.expect_exact(USER)
    child.transcript = "".join(transcript) + child.before
    yield child
    child.close(force=True)


def run(child, line):
    """Sends a line and returns everything printed until the next prompt."""
    child.sendline(line)
    child.expect_exact(USER)
    return child.before


def test_image_step_reports_bad_paths_and_goes_on(cli):
    assert "missing_image" in cli.transcript and "corrupt_image" in cli.transcript and "notes.txt" in cli.transcript
    assert "empty path" in cli.transcript
    assert "image 1 added" in cli.transcript and "red image.png" in cli.transcript  # quotes removed
    assert "1 image(s)" in cli.transcript and ":h" in cli.transcript


def test_help_is_bilingual(cli):
    out = run(cli, ":h")
    for command in (":exit", ":clear-history", ":history", ":seed <N>", ":conf <key>=<value>", ":reset-conf", ":img"):
        assert command in out
    assert "显示帮助信息" in out and "clear the history, keep the images" in out
    assert ":help / :h" in run(cli, ":help")


def test_reply_matches_engine_and_history(cli, expected, files):
    run(cli, ":new")
    run(cli, f":img {files / 'red image.png'}")
    out = run(cli, QUESTION)
    assert f"Assistant: {expected}\r\n" in out and len(expected) == 8
    history = run(cli, ":his")
    assert "History (1)" in history
    assert f"User[0]: <Img><ImageHere></Img>{QUESTION}" in history and f"Assistant[0]: {expected}" in history


def test_img_adds_images_mid_conversation_and_survives_bad_paths(cli, files):
    run(cli, ":new")
    assert "images (图片): 0" in run(cli, ":img")
    assert "missing_image" in run(cli, f":img {files / 'nope.png'}")
    assert "corrupt_image" in run(cli, f":img {files / 'notes.txt'}")
    assert "image 1 added" in run(cli, f":img {files / 'green.png'}")
    listing = run(cli, ":img")
    assert "[0]" in listing and "green.png (for the next question" in listing
    run(cli, "what")
    assert "green.png (for the next question" not in run(cli, ":img")
    assert "image 2 added" in run(cli, f":img {files / 'red image.png'}")
    assert re.search(r"\[1\] .*red image\.png \(for the next question", run(cli, ":img"))
    run(cli, "what")
    assert "User[1]: <Img><ImageHere></Img>what" in run(cli, ":his")


def test_seed_command(cli):
    assert "random seed (随机种子): 42" in run(cli, ":seed")
    assert "random seed (随机种子): 7" in run(cli, ":seed 7")
    assert "seed not changed" in run(cli, ":seed abc")
    assert "random seed (随机种子): 7" in run(cli, ":seed")
    assert "None" in run(cli, ":seed none")
    run(cli, ":seed 42")


def test_conf_is_parsed_safely_and_reset(cli, files):
    shown = run(cli, ":conf")
    assert "max_new_tokens = 8" in shown and "do_sample = False" in shown and "temperature = 1.0" in shown
    out = run(cli, ":conf temperature=0.5 top_k=3 do_sample=yes stop='[\"x\", \"y z\"]'")
    assert "temperature = 0.5" in out and "top_k = 3" in out and "do_sample = True" in out
    assert "stop = ('x', 'y z')" in out
    assert "stop = ('a', 'b c')" in run(cli, ':conf stop=["a", "b c"]')  # a JSON list as typed, spaces and all
    assert "stop = ('\\n',)" in run(cli, ':conf stop="\\n"')  # a JSON string: "\n" is a newline
    assert "stop = ('\\\\n',)" in run(cli, ":conf stop=\\n")  # unquoted: the two characters, as typed
    marker = files / "evaluated"
    injected = run(cli, f":conf temperature=__import__('pathlib').Path('{marker}').touch()")
    assert "not changed" in injected and not marker.exists()
    assert "unknown setting 'bogus'" in run(cli, ":conf bogus=1")
    assert "num_beams must be >= 1" in run(cli, ":conf num_beams=0")
    assert "must be an integer" in run(cli, ":conf max_new_tokens=2.5")
    assert "format is key=value" in run(cli, ":conf max_new_tokens")
    run(cli, ":seed 3")
    reset = run(cli, ":reset-conf")
    assert "temperature = 1.0" in reset and "do_sample = False" in reset and "stop = ()" in reset
    assert "seed = 3" in reset  # the seed is its own setting, as in the original
    run(cli, ":seed 42")


def test_ctrl_c_stops_a_streamed_reply_and_the_session_goes_on(cli, expected, files):
    run(cli, ":new")
    run(cli, ":conf max_new_tokens=100000")
    cli.sendline("what")
    cli.expect_exact("Assistant: ")
    cli.expect(r"[图中]{5}")  # streamed while the generation (100000 tokens) is far from done
    cli.expect(r"[图中]{20}")  # and still arriving
    cli.sendintr()
    cli.expect_exact("generation interrupted")
    cli.expect_exact(USER)
    assert "History (0)" in run(cli, ":his")  # the interrupted turn is not kept
    cli.sendintr()  # at the prompt: a hint, the session goes on
    cli.expect_exact(USER)
    assert "Ctrl-D leaves" in cli.before
    run(cli, ":reset-conf")
    run(cli, f":img {files / 'red image.png'}")
    assert f"Assistant: {expected}\r\n" in run(cli, QUESTION)


def test_clear_commands(cli, files):
    run(cli, ":new")
    run(cli, f":img {files / 'green.png'}")
    run(cli, "what")
    run(cli, "what")
    assert "all 2 turn(s) of history cleared" in run(cli, ":clh")
    assert "History (0)" in run(cli, ":his")
    assert "for the next question" in run(cli, ":img")  # the images stay, for the next question
    cleared = run(cli, ":clear")  # the screen only, as in the original
    assert "Welcome to MiniGPT4Qwen" in cleared and "History (0)" in run(cli, ":his")
    assert "for the next question" in run(cli, ":img")
    assert "history and images cleared" in run(cli, ":new")
    assert "images (图片): 0" in run(cli, ":img")
    assert "unknown command :foo" in run(cli, ":foo")
    assert "empty question" in run(cli, "")


def test_arrow_keys_edit_the_line_and_recall_earlier_ones(cli):
    run(cli, ":new")
    cli.send(f"helo{LEFT}l\r")  # "helo", Left, "l", Enter
    cli.expect_exact(USER)
    assert "User[0]: hello\r\n" in run(cli, ":his")
    cli.send(f"{UP}{UP}\r")  # Up twice: back past ":his" to "hello"
    cli.expect_exact(USER)
    assert "User[1]: hello\r\n" in run(cli, ":his")


def test_a_line_longer_than_the_terminal_line_buffer_arrives_whole(cli):
    run(cli, ":new")
    question = "red green " * 500  # 5000 characters: a terminal in line mode keeps 4095 of them
    for start in range(0, len(question), 500):  # in pieces, reading the echo, so neither side's buffer fills
        cli.send(question[start:start + 500])
        cli.expect_exact(question[start + 490:start + 500])
    cli.send("\r")
    cli.expect_exact(USER)
    assert f"User[0]: {question.strip()}\r\n" in run(cli, ":his")


def test_a_question_over_the_prompt_budget_is_refused_with_the_limit(files, capsys):
    model, tokenizer = load_exported(files / "model")
    session = ChatSession(model, tokenizer, max_window_size=60)
    session.add_image(files / "green.png")
    question = "red " * 30
    ids, _ = session.build_prompt(session.with_image_markers(question))
    assert question_tokens(session, question) == ids.shape[1] > 60  # the engine's count, no history
    cli = ChatCLI(session, GenerationSettings(max_new_tokens=2))
    assert not cli.answer(question)
    out = capsys.readouterr().out
    assert f"{ids.shape[1]} tokens" in out and "prompt budget of 60 tokens (--max-window-size)" in out
    assert "120 characters" in out and "1 image(s)" in out
    assert session.turns == [] and len(session.pending_images) == 1  # nothing sent, the image still waits
    assert cli.answer("red " * 5) and len(session.turns) == 1


def test_query_mode_answers_once(scripted, expected):
    out, err = scripted.communicate(timeout=120)
    assert scripted.returncode == 0 and out == expected + "\n"  # the answer alone on stdout, notes on stderr
    assert "image 1 added" in err


def test_query_mode_fails_fast_on_a_bad_image(files, capsys):
    argv = ["chat", "--model-dir", str(files / "no-model"), "--query", QUESTION, "--image", str(files / "missing.png")]
    assert main(argv) == 2  # before loading the model (the model directory does not even exist)
    captured = capsys.readouterr()
    assert captured.out == "" and "missing.png" in captured.err


def test_quit_ends_the_session(cli):
    cli.sendline(":q")
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0
