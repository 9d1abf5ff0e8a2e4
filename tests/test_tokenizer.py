"""The Qwen (v1) fast tokenizer built from the real qwen.tiktoken vs tiktoken driven directly, as Qwen's own
`QWenTokenizer` drives it (NFC first, every special allowed); plus special ids, decoding and error messages."""

import base64
import pickle
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from minigpt4qwen.text.qwen_tokenizer import (
    QWEN_PATTERN,
    QWEN_SPECIAL_TOKENS,
    build_qwen1_tokenizer,
    is_qwen1_tokenizer_dir,
    load_tokenizer,
    read_tiktoken_ranks,
)
from tests.reference import QWEN7B_DIR

QWEN_DIR = QWEN7B_DIR
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<Img>" + "<|extra_0|>" * 32 + "</Img> 这张图片里有什么？<|im_end|>\n<|im_start|>assistant\n"
    "图中是一只猫。A cat.<|im_end|>\n"
)
TEXTS = {
    "empty": "",
    "space": " ",
    "spaces": "   ",
    "tab": "\t",
    "ws_runs": "a  \t\t b\n\n\n  c \r\n\r\n d   ",
    "cr_runs": "line1\r\rline2\r\n",
    "newlines_only": "\n\n\n",
    "chinese": "你好，世界！今天天气怎么样？深度学习模型的训练需要大量数据。",
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock!",
    "contractions": "I'm sure you'll see they'd've DON'T it's WE'RE I've he'd",
    "japanese": "こんにちは、世界。カタカナとひらがな、そして漢字。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "russian_arabic": "Привет, мир! مرحبا بالعالم",
    "mixed": "中文English混合123テスト한국어",
    "python": "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "c": "for (int i = 0; i < n; ++i) {\n    sum += a[i];\n}",
    "json": '{"name": "MiniGPT4Qwen", "ids": [1, 2, 3], "ok": true, "nested": {"a": null, "b": "值"}}',
    "html_url": '<a href="https://github.com/x/y?tab=readme#usage">link</a>',
    "math": "E = mc^2, ∑_{i=1}^{n} i = n(n+1)/2, α≤β",
    "emoji": "😀👍🏽🎉 ok",
    "emoji_zwj": "👨‍👩‍👧‍👦 and ❤️‍🔥",
    "flags": "🇨🇳🇺🇸🇯🇵",
    "digits": "1234567890 3.14159265358979323846 -42",
    "long_number": "12345678901234567890123456789012345678901234567890",
    "fullwidth_digits": "１２３４５６７８９０ and １０",
    "phone": "Tel: 138-0013-8000",
    "nfc_e_acute": "Cafe\u0301 re\u0301sume\u0301",
    "nfc_angstrom": "\u212b and \u0041\u030a",
    "nfc_jamo": "\u1100\u1161\u11a8 \u1112\u1161\u11ab",
    "control_chars": "a\x00b\x01c\x7fd\u200be",
    "special_alone": "<|endoftext|>",
    "specials_in_text": "hi<|im_start|>user\nyo<|im_end|>\n<|endoftext|>end",
    "specials_spaced": " <|extra_0|> <|extra_204|> ",
    "extra_205_not_special": "<|extra_205|>",
    "extra_0_no_bars": "<extra_0>",
    "extra_0_x32": "<|extra_0|>" * 32,
    "chatml": CHATML,
}


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return QWEN_DIR


@pytest.fixture(scope="module")
def tok(qwen_dir):
    return load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def reference(qwen_dir) -> tiktoken.Encoding:
    """Qwen's tokenizer as QWenTokenizer builds it: tiktoken with Qwen's regex and the 208 specials."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise keep a copy of the file in /tmp
        ranks = load_tiktoken_bpe(str(qwen_dir / "qwen.tiktoken"))
    specials = {token: len(ranks) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def reference_encode(reference: tiktoken.Encoding, text: str) -> list[int]:
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_match_tiktoken(tok, reference, name):
    text = TEXTS[name]
    assert tok(text, add_special_tokens=False).input_ids == reference_encode(reference, text)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_decode_round_trips(tok, reference, name):
    text = TEXTS[name]
    ids = tok(text).input_ids
    assert tok.decode(ids) == reference.decode(ids) == unicodedata.normalize("NFC", text)


def test_pattern_is_qwens():
    assert QWEN_PATTERN == (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
        r"""|\s+(?!\S)|\s+"""
    )


def test_special_tokens_and_size(tok):
    assert len(QWEN_SPECIAL_TOKENS) == 208
    assert QWEN_SPECIAL_TOKENS[:4] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>")
    assert QWEN_SPECIAL_TOKENS[-1] == "<|extra_204|>"
    assert [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(151643, 151851))
    assert len(tok) == 151851
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token, tok.unk_token) == (151643, 151643, None, None)
    assert set(tok.all_special_ids) == set(range(151643, 151851))


def test_golden_ids_from_parity(tok):
    # The strings the original tokenizes, with the ids Qwen's tokenizer gives (parity.md (iv)).
    golden = {"<|extra_0|>": [151646], "\n": [198], "system": [8948], "user": [872], "assistant": [77091], " ": [220]}
    assert {text: tok(text).input_ids for text in golden} == golden
    assert tok("１０").input_ids == [20109, 26022]  # fullwidth digits split one by one, as Qwen's regex does
    assert tok("<|extra_205|>").input_ids != [151851] and max(tok("<|extra_205|>").input_ids) < 151643


def test_add_special_tokens_adds_nothing(tok):
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids


def test_skip_special_tokens_on_decode(tok):
    ids = tok("<|im_start|>assistant\nHi<|im_end|><|extra_0|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi"


def test_chat_template_is_chatml(tok):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.apply_chat_template(turns, tokenize=False) == (
        default + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, turns[0]]
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_tokenizer_never_runs_remote_code(tmp_path, qwen_dir, tok):
    (tmp_path / "qwen.tiktoken").symlink_to(qwen_dir / "qwen.tiktoken")
    (tmp_path / "tokenization_qwen.py").write_text("raise RuntimeError('remote code was executed')\n")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", null]}}'
    )
    assert is_qwen1_tokenizer_dir(tmp_path) and not is_qwen1_tokenizer_dir(tmp_path / "qwen.tiktoken")
    loaded = load_tokenizer(tmp_path)
    assert loaded(CHATML).input_ids == tok(CHATML).input_ids


def test_load_tokenizer_returns_independent_copies(qwen_dir, tok):
    other = load_tokenizer(qwen_dir / "qwen.tiktoken")
    other.padding_side = "left"
    assert other is not tok and tok.padding_side == "right"


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tiktoken.*qwen\.tiktoken"):
        build_qwen1_tokenizer(tmp_path / "nope.tiktoken")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_tokenizer(tmp_path / "missing_dir")


def test_dir_without_any_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="without remote code"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, b"not base64!! 0\n", b"YQ== 0 extra\n", b"YQ== zero\n", b"\n\n"],
    ids=["random_bytes", "bad_base64", "three_fields", "bad_rank", "no_lines"],
)
def test_corrupt_vocab_file(tmp_path, content):
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="qwen.tiktoken"):
        build_qwen1_tokenizer(path)


def test_vocab_with_wrong_rank_count(tmp_path):
    path = tmp_path / "small.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    assert len(read_tiktoken_ranks(path)) == 256
    with pytest.raises(ValueError, match=r"256 BPE ranks.*151643"):
        build_qwen1_tokenizer(path)


def test_vocab_with_rank_gap(tmp_path):
    path = tmp_path / "gap.tiktoken"
    path.write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="not exactly 0..1"):
        read_tiktoken_ranks(path)


def test_pickle_keeps_ids(tok):
    # DataLoader worker processes receive the tokenizer pickled.
    assert pickle.loads(pickle.dumps(tok))(CHATML).input_ids == tok(CHATML).input_ids
