"""The tiny word-level ChatML tokenizer: fixed special ids, deterministic vocabulary, exact decoding, ChatML use."""

from minigpt4qwen.text.conversation import IGNORE_INDEX, render_chatml
from minigpt4qwen.text.tiny_tokenizer import TINY_SPECIAL_TOKENS, build_tiny_chat_tokenizer

WORDS = ["What color is the square?", "The square is red.", "这是一只猫。", "café"]


def test_special_tokens_have_fixed_ids():
    tok = build_tiny_chat_tokenizer(WORDS)
    assert tok.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 0, 4)
    assert tok.convert_tokens_to_ids("<|extra_0|>") == 3


def test_vocabulary_is_deterministic_and_sorted():
    a = build_tiny_chat_tokenizer(WORDS)
    b = build_tiny_chat_tokenizer(list(reversed(WORDS)) + WORDS)  # order and duplicates do not matter
    assert a.get_vocab() == b.get_vocab()
    pieces = [t for t, _ in sorted(a.get_vocab().items(), key=lambda kv: kv[1])][len(TINY_SPECIAL_TOKENS) :]
    assert pieces == sorted(pieces)


def test_latin_words_whole_cjk_per_character_and_exact_decode():
    tok = build_tiny_chat_tokenizer(WORDS)
    text = "The square is red.\n这是一只猫。 café"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids[:4]) == ["The", " ", "square", " "]
    assert ["这", "是", "一", "只", "猫", "。"] == tok.convert_ids_to_tokens(ids[9:15])
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False).input_ids) == ["<unk>"]


def test_render_chatml_works_and_matches_chat_template():
    tok = build_tiny_chat_tokenizer(WORDS)
    messages = [
        {"role": "user", "content": "<Img><ImageHere></Img> What color is the square?"},
        {"role": "assistant", "content": "The square is red."},
    ]
    rendered = render_chatml(tok, messages, image_token_id=3, num_query_tokens=2)
    assert rendered.image_spans and rendered.input_ids.count(3) == 2
    learned = [t for t in rendered.labels if t != IGNORE_INDEX]
    assert tok.decode(learned) == "The square is red.<|im_end|>"
    text_only = [{"role": "user", "content": "What color is the square?"}, messages[1]]
    plain = render_chatml(tok, text_only, image_token_id=3, num_query_tokens=2)
    assert tok.decode(plain.input_ids) == tok.apply_chat_template(text_only, tokenize=False)
