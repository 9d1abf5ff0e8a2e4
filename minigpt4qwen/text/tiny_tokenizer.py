"""A tiny word-level ChatML tokenizer for CPU demos and tests: Latin words whole, CJK one character per token.

Spaces, newlines, digits and punctuation are tokens of their own, so decoding is plain concatenation and
reproduces the input text exactly for in-vocabulary words. Special tokens follow Qwen's ChatML names.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minigpt4qwen.text.qwen_tokenizer import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT

PAD_EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = "<|extra_0|>"
UNK_TOKEN = "<unk>"
# Ids 0..4 in this order, whatever the words: the image placeholder id is then always 3.
TINY_SPECIAL_TOKENS: tuple[str, ...] = (PAD_EOS_TOKEN, IM_START, IM_END, IMAGE_PLACEHOLDER, UNK_TOKEN)

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
# One CJK character | a run of other letters (with combining marks) | one digit | one whitespace | one other char.
_PIECE_PATTERN = rf"[{_CJK}]|[\p{{L}}\p{{M}}&&[^{_CJK}]]+|\p{{N}}|\s|[^\s\p{{L}}\p{{M}}\p{{N}}]"
# The same split in Python's `re` (no \p classes there), used to collect the vocabulary from `words`.
_PY_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PY_PIECE = re.compile(rf"[{_PY_CJK}]|(?:(?![{_PY_CJK}])[^\W\d_])+|\d|\s|[^\w\s]|_")

# Always in the vocabulary: what ChatML rendering and the original's `<Img>...</Img>` wrapper write.
_BASE_TEXT = ("system", "user", "assistant", DEFAULT_SYSTEM_PROMPT, "<Img></Img>", *string.printable)


def _pieces(text: str) -> list[str]:
    """Split `text` the way the tokenizer's normalizer and pre-tokenizer do."""
    return _PY_PIECE.findall(unicodedata.normalize("NFC", text))


def build_tiny_chat_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a deterministic word-level ChatML tokenizer covering `words`.

    Each item of `words` may be a single word or a whole text; it is split like the tokenizer splits its input
    and every piece joins the vocabulary. ASCII printable characters, the ChatML role names and the default
    system prompt are always included. Ids: the specials first (`<|endoftext|>`=0 pad/eos, `<|im_start|>`=1,
    `<|im_end|>`=2, `<|extra_0|>`=3 image placeholder, `<unk>`=4), then the pieces in sorted order.

    Args:
        words: words or texts to cover.

    Returns:
        A fast tokenizer with a ChatML `chat_template`; unknown pieces map to `<unk>`.
    """
    pieces: set[str] = set()
    for text in (*_BASE_TEXT, *words):
        pieces.update(_pieces(text))
    pieces.difference_update(TINY_SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate((*TINY_SPECIAL_TOKENS, *sorted(pieces)))}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    # Whitespace is kept as tokens, so decoding is concatenation.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=PAD_EOS_TOKEN,
        pad_token=PAD_EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START, IM_END, IMAGE_PLACEHOLDER],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
