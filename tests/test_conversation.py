"""Golden tests of conversation rendering on the real Qwen vocabulary: exact ids, label masks in both modes
(the `original` one against MiniGPT4Qwen's `preprocess` formula written out here), placeholder runs, and typed
special tokens that must stay plain text."""

import copy

import pytest
from tokenizers import Regex, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import PreTrainedTokenizerFast

from minigpt4qwen.text.conversation import IGNORE_INDEX, render_chatml, render_with_template
from minigpt4qwen.text.qwen_tokenizer import load_tokenizer
from tests.reference import QWEN7B_DIR

QWEN_DIR = QWEN7B_DIR
ENDOFTEXT, IM_START, IM_END, EXTRA_0 = 151643, 151644, 151645, 151646
NL, SYSTEM, USER, ASSISTANT = 198, 8948, 872, 77091  # "\n", "system", "user", "assistant" (parity.md (iv))
Q = 4  # query tokens per image; small so that hand-built sequences stay readable

ONE_IMAGE = [
    {"role": "user", "content": "<Img><ImageHere></Img> Describe it."},
    {"role": "assistant", "content": "A dog on grass."},
]
MULTI_TURN = ONE_IMAGE + [
    {"role": "user", "content": "What colour is it?"},
    {"role": "assistant", "content": "棕色的。"},
]
TWO_IMAGES = [
    {"role": "user", "content": "<Img><ImageHere></Img> vs <Img><ImageHere></Img>: which is newer?"},
    {"role": "assistant", "content": "The second."},
]
TEXT_ONLY = [
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你的？"},
]
CONVERSATIONS = {"one_image": ONE_IMAGE, "multi_turn": MULTI_TURN, "two_images": TWO_IMAGES, "text_only": TEXT_ONLY}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN_DIR)


def text_ids(tok, text: str) -> list[int]:
    """Plain-text ids of a string holding no special tokens."""
    return tok(text, add_special_tokens=False).input_ids


def reference_preprocess(tok, conversation, image_len: int, system_message="You are a helpful assistant."):
    """MiniGPT4Qwen's `preprocess` for one conversation, written out plainly.

    Its roles are the strings "<|im_start|>user" / "<|im_start|>assistant", tokenized with specials recognised
    (2 ids each), and `<ImageHere>` became `image_len` copies of "<|extra_0|>" before tokenizing.
    """
    def enc(text: str) -> list[int]:
        return tok(text).input_ids

    nl = enc("\n")
    system = [IM_START] + enc("system") + nl + enc(system_message) + [IM_END] + nl
    input_id, target = list(system), [IM_START] + [IGNORE_INDEX] * (len(system) - 3) + [IM_END] + nl
    for turn in conversation:
        role = "<|im_start|>" + turn["role"]
        content = turn["content"].replace("<ImageHere>", "<|extra_0|>" * image_len)
        block = enc(role) + nl + enc(content) + [IM_END] + nl
        input_id += block
        if turn["role"] == "user":
            target += [IM_START] + [IGNORE_INDEX] * (len(block) - 3) + [IM_END] + nl
        else:
            n_role = len(enc(role))
            target += [IM_START] + [IGNORE_INDEX] * n_role + block[n_role + 1 : -2] + [IM_END] + nl
    return input_id, target


def test_one_image_golden_ids_and_assistant_labels(tok):
    out = render_chatml(tok, ONE_IMAGE, image_token_id=EXTRA_0, num_query_tokens=Q)
    system = [IM_START, SYSTEM, NL, *text_ids(tok, "You are a helpful assistant."), IM_END, NL]
    user = [IM_START, USER, NL, *text_ids(tok, "<Img>"), *[EXTRA_0] * Q, *text_ids(tok, "</Img> Describe it.")]
    answer = text_ids(tok, "A dog on grass.")
    expected = system + user + [IM_END, NL] + [IM_START, ASSISTANT, NL, *answer, IM_END, NL]
    assert out.input_ids == expected
    assert out.labels == [IGNORE_INDEX] * (len(expected) - len(answer) - 2) + answer + [IM_END, IGNORE_INDEX]
    start = len(system) + 3 + len(text_ids(tok, "<Img>"))
    assert out.num_images == 1 and out.image_spans == [(start, start + Q)]


def test_original_mode_is_the_original_formula(tok):
    out = render_chatml(tok, ONE_IMAGE, image_token_id=EXTRA_0, num_query_tokens=Q, label_mode="original")
    answer = text_ids(tok, "A dog on grass.")
    # The assistant block: <|im_start|> kept, "assistant" and the "\n" after it ignored, content, <|im_end|>, "\n".
    assert out.labels[-(len(answer) + 5) :] == [IM_START, IGNORE_INDEX, IGNORE_INDEX, *answer, IM_END, NL]
    # System and user blocks: only <|im_start|>, <|im_end|> and the closing "\n" are targets.
    kept = [(i, t) for i, t in enumerate(out.labels[: -(len(answer) + 5)]) if t != IGNORE_INDEX]
    assert [t for _, t in kept] == [IM_START, IM_END, NL, IM_START, IM_END, NL]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("num_query_tokens", [Q, 32])
def test_original_mode_matches_reference_preprocess(tok, name, num_query_tokens):
    conversation = CONVERSATIONS[name]
    out = render_chatml(
        tok, conversation, image_token_id=EXTRA_0, num_query_tokens=num_query_tokens, label_mode="original"
    )
    assert (out.input_ids, out.labels) == reference_preprocess(tok, conversation, num_query_tokens)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("label_mode", ["assistant", "original"])
def test_placeholder_runs(tok, name, label_mode):
    out = render_chatml(tok, CONVERSATIONS[name], image_token_id=EXTRA_0, num_query_tokens=32, label_mode=label_mode)
    expected_images = sum(m["content"].count("<ImageHere>") for m in CONVERSATIONS[name])
    assert out.num_images == len(out.image_spans) == expected_images
    for start, end in out.image_spans:
        assert end - start == 32
        assert out.input_ids[start:end] == [EXTRA_0] * 32 and out.labels[start:end] == [IGNORE_INDEX] * 32
        assert out.input_ids[start - 1] != EXTRA_0 and out.input_ids[end] != EXTRA_0
    assert out.input_ids.count(EXTRA_0) == 32 * expected_images
    assert len(out.labels) == len(out.input_ids)


def test_assistant_labels_cover_exactly_the_replies(tok):
    out = render_chatml(tok, MULTI_TURN, image_token_id=EXTRA_0, num_query_tokens=Q)
    supervised = [t for t in out.labels if t != IGNORE_INDEX]
    assert supervised == text_ids(tok, "A dog on grass.") + [IM_END] + text_ids(tok, "棕色的。") + [IM_END]


@pytest.mark.parametrize("typed", ["<|extra_0|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|extra_204|>"])
@pytest.mark.parametrize("render", [render_chatml, render_with_template])
def test_typed_special_tokens_stay_text(tok, typed, render):
    content = f"Look {typed}<ImageHere>{typed} here"
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": f"Sure{typed}"}]
    out = render(tok, messages, image_token_id=EXTRA_0, num_query_tokens=Q)
    (start, end), = out.image_spans
    assert out.input_ids.count(EXTRA_0) == Q and out.input_ids[start:end] == [EXTRA_0] * Q
    specials = [t for t in out.input_ids if t >= ENDOFTEXT and t != EXTRA_0]
    assert specials == [IM_START, IM_END, IM_START, IM_END, IM_START, IM_END]  # system, user, assistant frames
    assert tok.decode(out.input_ids[end:]).startswith(f"{typed} here<|im_end|>")


def test_system_message_and_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = render_chatml(tok, messages, image_token_id=EXTRA_0, num_query_tokens=Q, add_generation_prompt=True)
    assert out.input_ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert out.input_ids[-3:] == [IM_START, ASSISTANT, NL] and set(out.labels) == {IGNORE_INDEX}
    no_system = render_chatml(tok, messages[1:], image_token_id=EXTRA_0, num_query_tokens=Q, system_prompt=None)
    assert no_system.input_ids == [IM_START, USER, NL, *text_ids(tok, "Hi"), IM_END, NL]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_path_equals_chatml_on_qwen(tok, name):
    # The Qwen tokenizer's ChatML template and the hand-written ChatML layout must agree token for token.
    kwargs = dict(image_token_id=EXTRA_0, num_query_tokens=Q)
    assert render_with_template(tok, CONVERSATIONS[name], **kwargs) == render_chatml(tok, CONVERSATIONS[name], **kwargs)
    prompt = CONVERSATIONS[name][:1]
    assert render_with_template(tok, prompt, **kwargs, add_generation_prompt=True) == render_chatml(
        tok, prompt, **kwargs, add_generation_prompt=True
    )


LLAMA2_LIKE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{%- elif m['role'] == 'user' -%}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
    "{%- endfor -%}"
)


def with_template(tok, template: str):
    other = copy.copy(tok)
    other.chat_template = template
    return other


def test_template_path_tokenizes_the_prompt_whole_and_the_reply_apart(tok):
    # Frame text touches the contents here ("[INST] Name it. [/INST] Sure"): the prompt is one text run, as a
    # whole-string encoding, but the reply starts its own run, as generation starts it after the prompt's space.
    llama = with_template(tok, LLAMA2_LIKE)
    messages = [{"role": "user", "content": "Name it."}, {"role": "assistant", "content": "Sure, a cat."}]
    out = render_with_template(llama, messages, image_token_id=EXTRA_0, num_query_tokens=Q)
    prompt = render_with_template(llama, messages[:1], image_token_id=EXTRA_0, num_query_tokens=Q,
                                  add_generation_prompt=True)
    assert prompt.input_ids == text_ids(tok, "[INST] Name it. [/INST] ")
    reply = text_ids(tok, "Sure, a cat.")
    assert reply != text_ids(tok, " Sure, a cat.")[1:]  # merged with the space, the reply would read otherwise
    assert out.input_ids == prompt.input_ids + reply + [ENDOFTEXT]
    # Targets: the reply through its end-of-turn token, none of the prompt.
    assert out.labels == [IGNORE_INDEX] * len(prompt.input_ids) + reply + [ENDOFTEXT]


@pytest.mark.parametrize("reply", ["\n\nAnswer.", "\nAnswer.\n", " Answer."])
def test_template_path_learns_no_header_token_when_a_reply_starts_with_whitespace(tok, reply):
    # Qwen's template writes "assistant\n" before a reply; merged with a reply's "\n\n" it would encode as one
    # "\n\n\n" token, half header and labelled as a target. The reply is encoded on its own, as ChatML does.
    kwargs = dict(image_token_id=EXTRA_0, num_query_tokens=Q)
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": reply}]
    out = render_with_template(tok, messages, **kwargs)
    assert out == render_chatml(tok, messages, **kwargs)
    assert [t for t in out.labels if t != IGNORE_INDEX] == (text_ids(tok, reply) + [IM_END]) * 2
    # Truncation finds the answer where the generation prompt ends: that prompt is a prefix of the sample.
    prompt = render_with_template(tok, messages[:-1], **kwargs, add_generation_prompt=True)
    assert out.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert out.labels[len(prompt.input_ids)] == out.input_ids[len(prompt.input_ids)]


def test_template_path_images(tok):
    llama = with_template(tok, LLAMA2_LIKE)
    out = render_with_template(llama, TWO_IMAGES, image_token_id=EXTRA_0, num_query_tokens=Q)
    assert out.num_images == 2 and [e - s for s, e in out.image_spans] == [Q, Q]
    for start, end in out.image_spans:
        assert out.input_ids[start:end] == [EXTRA_0] * Q and set(out.labels[start:end]) == {IGNORE_INDEX}
    assert tok.decode(out.input_ids[: out.image_spans[0][0]]) == "[INST] <Img>"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", "rewrites message 0's content"),
        ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}", "once"),
        ("{% for m in messages %}<|extra_0|>{{ m['content'] }}{% endfor %}", "placeholder"),
    ],
    ids=["lowercases", "drops_system", "writes_placeholder"],
)
def test_template_path_rejects_unsound_templates(tok, template, match):
    messages = [{"role": "system", "content": " S "}, {"role": "user", "content": "U"}]
    with pytest.raises(ValueError, match=match):
        render_with_template(with_template(tok, template), messages, image_token_id=EXTRA_0, num_query_tokens=Q)


def test_template_path_rejects_original_mode(tok):
    with pytest.raises(ValueError, match="assistant"):
        render_with_template(tok, TEXT_ONLY, image_token_id=EXTRA_0, num_query_tokens=Q, label_mode="original")


@pytest.mark.parametrize(
    ("messages", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([{"role": "bot", "content": "x"}], {}, ValueError, "unknown role"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], {}, ValueError, "only come first"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<ImageHere>"}], {}, ValueError, "user"),
        (TEXT_ONLY, {"add_generation_prompt": True}, ValueError, "already an assistant"),
        (TEXT_ONLY, {"label_mode": "all"}, ValueError, "label_mode"),
        (TEXT_ONLY, {"num_query_tokens": 0}, ValueError, "num_query_tokens"),
        (TEXT_ONLY, {"image_token_id": 151851}, ValueError, "outside the vocabulary"),
        (["hello"], {}, TypeError, "mapping"),
        ([{"role": "user", "content": None}], {}, TypeError, "str"),
    ],
    ids=["empty", "role", "system_late", "image_in_reply", "gen_after_reply", "mode", "queries", "id", "str", "none"],
)
def test_render_errors(tok, messages, kwargs, error, match):
    with pytest.raises(error, match=match):
        render_chatml(tok, messages, **{"image_token_id": EXTRA_0, "num_query_tokens": Q, **kwargs})


def test_needs_chatml_tokens_and_a_template():
    words = Tokenizer(WordLevel({"[UNK]": 0, "user": 1, "hi": 2}, unk_token="[UNK]"))
    tiny = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(ValueError, match="ChatML"):
        render_chatml(tiny, TEXT_ONLY, image_token_id=1, num_query_tokens=Q)
    with pytest.raises(ValueError, match="chat_template"):
        render_with_template(tiny, TEXT_ONLY, image_token_id=1, num_query_tokens=Q)


def test_unknown_words_are_plain_text():
    # A word-level vocabulary maps unknown words to <unk>, a special token that plain text may still produce.
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "user", "\n", "hi"])}
    words = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = Split(Regex(r"\s|\w+|[^\w\s]+"), behavior="isolated")
    tiny = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", extra_special_tokens=["<|im_start|>", "<|im_end|>", "<|extra_0|>"]
    )
    messages = [{"role": "user", "content": "hi zebra"}]
    out = render_chatml(tiny, messages, image_token_id=3, num_query_tokens=Q, system_prompt=None)
    assert out.input_ids == [1, 4, 5, 6, 0, 0, 2, 5]
