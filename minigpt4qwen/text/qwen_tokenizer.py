"""Qwen (v1) tokenizer as a plain `transformers` fast tokenizer, built from `qwen.tiktoken` without remote code.

`load_tokenizer(path)` is the entry point: a Qwen-7B/14B(-Chat) directory (it holds `qwen.tiktoken`) gets the
tokenizer built here, whose ids equal Qwen's tiktoken `QWenTokenizer`; any other directory goes to `AutoTokenizer`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
from pathlib import Path

from tokenizers import normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen's pre-tokenizer split. Unlike the converter's default it splits digits one by one (`\p{N}`, not
# `\p{N}{1,3}`): the vocabulary has merged fullwidth-digit tokens that the default would wrongly produce.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Order matters: the specials take ids 151643, 151644, ... in exactly this order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)
QWEN_VOCAB_FILE = "qwen.tiktoken"
QWEN_NUM_RANKS = 151643
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML with Qwen2's semantics: a default system turn when the first message is not a system message.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def read_tiktoken_ranks(tiktoken_file: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (one `base64(token) rank` per line) and check it is a complete ranking.

    Args:
        tiktoken_file: path of the `.tiktoken` file.

    Returns:
        token bytes -> rank, with ranks exactly 0..N-1.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not `base64 rank`, or tokens/ranks repeat or leave gaps.
    """
    path = Path(tiktoken_file)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken vocabulary not found: {path} (expected a Qwen `qwen.tiktoken` BPE file)")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"{len(fields)} fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as err:
            raise ValueError(
                f"{path} is not a tiktoken BPE file: line {lineno} should be `<base64 token> <rank>`, "
                f"got {line[:60]!r} ({err})"
            ) from None
        if token in ranks:
            raise ValueError(f"{path}: token {token!r} is listed twice (line {lineno})")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} is not a tiktoken BPE file: it holds no `<base64 token> <rank>` lines")
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{path}: the {len(ranks)} ranks are not exactly 0..{len(ranks) - 1} (repeats or gaps)")
    return ranks


class _RanksConverter(TikTokenConverter):
    """`TikTokenConverter` fed with ranks we already read and validated.

    The stock converter re-reads the file through `tiktoken.load`, which caches every file it reads in a temp
    folder keyed by the path alone: a vocabulary replaced at the same path would then be served stale.
    """

    def __init__(self, ranks: dict[bytes, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self._ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
        return self._ranks


def build_qwen1_tokenizer(tiktoken_file: Path) -> PreTrainedTokenizerFast:
    """Build the Qwen (v1) fast tokenizer from `qwen.tiktoken`.

    Ids equal Qwen's own tiktoken tokenizer (checked in parity.md (iv)); the 208 specials sit at 151643..151850
    and `len(tokenizer) == 151851`. It has eos = pad = `<|endoftext|>`, no bos/unk, and a ChatML chat template.

    Args:
        tiktoken_file: path of `qwen.tiktoken`.

    Returns:
        The tokenizer (about 3 s to build).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a tiktoken BPE file, or it does not hold Qwen's 151643 ranks.
    """
    path = Path(tiktoken_file)
    ranks = read_tiktoken_ranks(path)
    if len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(
            f"{path} has {len(ranks)} BPE ranks but Qwen's vocabulary has {QWEN_NUM_RANKS}: the special tokens "
            f"would not land at ids {QWEN_NUM_RANKS}..{QWEN_NUM_RANKS + len(QWEN_SPECIAL_TOKENS) - 1}"
        )
    backend = _RanksConverter(
        ranks, vocab_file=str(path), pattern=QWEN_PATTERN, extra_special_tokens=list(QWEN_SPECIAL_TOKENS)
    ).converted()
    # Qwen NFC-normalises before splitting; without it decomposed accents and jamo give different ids.
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=QWEN_SPECIAL_TOKENS[0],
        pad_token=QWEN_SPECIAL_TOKENS[0],
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != QWEN_NUM_RANKS + offset:
            raise ValueError(f"{path}: special token {token} did not get id {QWEN_NUM_RANKS + offset}")
    return tokenizer


def is_qwen1_tokenizer_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding Qwen (v1)'s `qwen.tiktoken`.

    Args:
        path: a directory (anything else gives False).

    Returns:
        True when `path/qwen.tiktoken` is a file.
    """
    return Path(path).is_dir() and (Path(path) / QWEN_VOCAB_FILE).is_file()


@functools.lru_cache(maxsize=4)
def _cached_qwen1_tokenizer(tiktoken_file: Path, mtime_ns: int, size: int) -> PreTrainedTokenizerFast:
    # mtime and size are part of the key so that a file replaced in place is rebuilt.
    return build_qwen1_tokenizer(tiktoken_file)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer of a local model directory, never running remote code.

    A directory holding `qwen.tiktoken` (Qwen-7B/14B(-Chat) v1) gets `build_qwen1_tokenizer`; its
    `tokenization_qwen.py` is never imported. A `.tiktoken` file path is accepted too. Anything else goes to
    `AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)`; one without a pad
    token (Llama 3) pads with its eos token.

    The Qwen build is memoised per file within the process; each call returns a shallow copy, so plain attributes
    (`padding_side`, `model_max_length`, ...) are per copy while the vocabulary backend is shared (do not add
    tokens to it).

    Args:
        path: a local model directory, or a `.tiktoken` file.

    Returns:
        A fast tokenizer.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a `qwen.tiktoken` that is malformed or is not Qwen's vocabulary, or a directory with no
            tokenizer that loads without remote code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path not found: {path} (expected a model directory or a .tiktoken file)")
    if is_qwen1_tokenizer_dir(path):
        path = path / QWEN_VOCAB_FILE
    if path.is_file() and path.suffix == ".tiktoken":
        resolved = path.resolve()
        stat = resolved.stat()
        return copy.copy(_cached_qwen1_tokenizer(resolved, stat.st_mtime_ns, stat.st_size))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no tokenizer in {path} loads without remote code: expected `{QWEN_VOCAB_FILE}` (Qwen v1) or the "
            f"files of a `transformers` tokenizer such as tokenizer.json ({err})"
        ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Llama 3 ships no pad token; batches need one. Padding is masked out and never learned.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
