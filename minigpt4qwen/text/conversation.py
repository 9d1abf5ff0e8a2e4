"""Conversations -> token ids and training labels, built together in one pass, segment by segment.

`render_chatml` lays out Qwen's ChatML turn by turn (the original MiniGPT4Qwen layout, two label modes);
`render_with_template` serves any LLM whose tokenizer has a chat template. Both expand each `<ImageHere>` into
`num_query_tokens` placeholder ids and encode message text with special tokens off, so a typed `<|im_end|>` or
`<|extra_0|>` stays plain text and can never shift image rows.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from minigpt4qwen.text.chat_template import template_layout
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

# tokenizer -> (its special tokens, control tokens, their split pattern); see `_control_split`.
_CONTROL_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

IGNORE_INDEX = -100
IMAGE_MARKER = "<ImageHere>"
ROLES = ("system", "user", "assistant")
LABEL_MODES = ("assistant", "original")
# Splits content into text, marker, text, ..., text: odd indices are markers.
_IMAGE_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)})")

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}, as apply_chat_template


@dataclass(frozen=True)
class RenderedConversation:
    """Token ids and training labels of one conversation.

    Attributes:
        input_ids: the token ids.
        labels: same length as input_ids, unshifted: the id where the position is a target, IGNORE_INDEX elsewhere.
        num_images: how many IMAGE_MARKERs were expanded (the sample must bring that many images).
        image_spans: [start, end) of each placeholder run in input_ids, in image order; each is num_query_tokens
            long. Truncation must not cut through one.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class _Segment:
    """A piece of the sequence: `text` encoded as plain text, or fixed `ids`; `target` marks supervised tokens."""

    text: str | None = None
    ids: tuple[int, ...] = ()
    target: bool = False
    image: bool = False


def render_chatml(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    image_token_id: int,
    num_query_tokens: int,
    label_mode: str = "assistant",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
) -> RenderedConversation:
    """Render a conversation as Qwen ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn.

    Role names, "\\n" and each text piece of a message are encoded separately (as the original and Qwen's
    `make_context` do); `<|im_start|>`, `<|im_end|>` and placeholder runs are inserted as ids.
    Label modes (placeholders are IGNORE_INDEX in both):
        "assistant": each reply's content tokens and its `<|im_end|>` are targets, nothing else.
        "original": MiniGPT4Qwen's `preprocess`, token for token: every turn's `<|im_start|>`, `<|im_end|>` and
            closing "\\n" are targets, and so is assistant content; role names and the "\\n" after them are not.

    Args:
        tokenizer: a tokenizer with `<|im_start|>` and `<|im_end|>` special tokens.
        messages: the conversation; a leading system message replaces `system_prompt`.
        image_token_id: the placeholder id (`<|extra_0|>`, 151646, for Qwen).
        num_query_tokens: placeholder ids per image.
        label_mode: "assistant" or "original".
        system_prompt: system turn used when `messages` has none; None writes no system turn.
        add_generation_prompt: append `<|im_start|>assistant\\n` (unsupervised) for generation.

    Returns:
        The rendered conversation.

    Raises:
        ValueError: bad messages or arguments (see `render_with_template`), an unknown label mode, or a tokenizer
            without ChatML special tokens.
        TypeError: a message that is not a mapping, or content that is not a str.
    """
    _check_request(tokenizer, messages, image_token_id, num_query_tokens, add_generation_prompt)
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label_mode {label_mode!r} (expected one of {LABEL_MODES})")
    controls = _control_tokens(tokenizer)
    if "<|im_start|>" not in controls or "<|im_end|>" not in controls:
        raise ValueError("render_chatml needs a ChatML tokenizer (<|im_start|> and <|im_end|> special tokens); for "
                         "other LLMs render with their own chat template: data.chat_format=template")
    im_start, im_end = controls["<|im_start|>"], controls["<|im_end|>"]
    # "original" keeps MiniGPT4Qwen's targets. Its role strings ("<|im_start|>assistant") are 2 ids, so its
    # reply target [im_start] + [IGNORE] * 2 + content + [im_end] + nl also ignores the "\n" after the role.
    original = label_mode == "original"
    turns = [(m["role"], m["content"]) for m in messages]
    if turns[0][0] != "system" and system_prompt is not None:
        turns.insert(0, ("system", system_prompt))
    segments: list[_Segment] = []
    for role, content in turns:
        reply = role == "assistant"
        segments += [_Segment(ids=(im_start,), target=original), _Segment(text=role), _Segment(text="\n")]
        segments += [
            _Segment(ids=(image_token_id,) * num_query_tokens, image=True) if k % 2 else _Segment(text=p, target=reply)
            for k, p in enumerate(_IMAGE_SPLIT.split(content))
        ]
        segments += [_Segment(ids=(im_end,), target=original or reply), _Segment(text="\n", target=original)]
    if add_generation_prompt:
        segments += [_Segment(ids=(im_start,)), _Segment(text="assistant"), _Segment(text="\n")]
    texts = [s.text for s in segments if s.text is not None]
    encoded = iter(_encode_plain(tokenizer, texts, controls.values())["input_ids"])
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for seg in segments:
        ids = next(encoded) if seg.text is not None else list(seg.ids)
        if seg.image:
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids += ids
        labels += ids if seg.target else [IGNORE_INDEX] * len(ids)
    return _finish(input_ids, labels, spans, image_token_id, num_query_tokens)


def render_with_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    image_token_id: int,
    num_query_tokens: int,
    label_mode: str = "assistant",
    add_generation_prompt: bool = False,
) -> RenderedConversation:
    """Render a conversation with the tokenizer's own chat template (Qwen2.5, Qwen3, Llama 3, ChatML, ...).

    `template_layout` (chat_template.py) renders the messages with the template and locates every content and
    every supervised span in its output. The string is cut at the template's special tokens (inserted as ids), at
    image markers and where each assistant reply starts; the text between is encoded with special tokens off, so
    typed special tokens stay text. Cutting at a reply's start is what generation does (the prompt ends there) and
    what `render_chatml` does, so no token spans the header and the reply; elsewhere the ids equal a whole-string
    encoding. A token is a target when its characters overlap a supervised span: each reply's content through its
    end-of-turn token, or what the template's `{% generation %}` blocks mark.

    Args:
        tokenizer: a tokenizer with a `chat_template`.
        messages: the conversation; IMAGE_MARKER may appear in user messages only.
        image_token_id: the placeholder id; it must be a special token so text cannot produce it.
        num_query_tokens: placeholder ids per image.
        label_mode: only "assistant" ("original" is ChatML-specific: use `render_chatml`).
        add_generation_prompt: end with the template's own header of an assistant reply (the text it writes
            before a reply's content), unsupervised.

    Returns:
        The rendered conversation.

    Raises:
        ValueError: empty messages, an unknown role, a system message not first, an image marker outside user
            messages, an assistant message last with add_generation_prompt, a template that drops, reorders
            or rewrites contents, or placeholder ids that text or the template produced.
        TypeError: a message that is not a mapping, or content that is not a str.
    """
    _check_request(tokenizer, messages, image_token_id, num_query_tokens, add_generation_prompt)
    if label_mode != "assistant":
        raise ValueError(f"render_with_template supports label_mode='assistant' only, got {label_mode!r}")
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat_template: use an instruct/chat model's directory, or "
                         "render_chatml (data.chat_format=chatml) for Qwen-7B/14B-Chat")
    controls, control_split = _control_split(tokenizer)
    layout = template_layout(tokenizer, messages, list(controls), add_generation_prompt=add_generation_prompt)
    # The text as chunks (kind, text, start): "text" (merged), "control" (a special token written by the
    # template, outside the contents) or "image" (a marker in a user content).
    chunks: list[tuple[str, str, int]] = []
    pos = 0
    for i, (begin, end) in enumerate([*layout.contents, (len(layout.text), len(layout.text))]):
        frame = layout.text[pos:begin]
        # (kind, text, starts a run): an assistant reply starts its own text run, never merged with the header
        # before it. Generation stops the prompt right there, so a token straddling header and reply ("\n" +
        # "\n\n" -> "\n\n\n") exists only in training; merged, it would also carry a target label into the prompt.
        pieces = [("control" if k % 2 else "text", p, False) for k, p in enumerate(control_split.split(frame))]
        if i < len(layout.contents):
            content, reply = layout.text[begin:end], messages[i]["role"] == "assistant"
            pieces += [("image" if k % 2 else "text", p, reply and k == 0)
                       for k, p in enumerate(_IMAGE_SPLIT.split(content))]
        for kind, text, new_run in pieces:
            if kind == "text" and not new_run and chunks and chunks[-1][0] == "text":
                chunks[-1] = ("text", chunks[-1][1] + text, chunks[-1][2])
            elif text:
                chunks.append((kind, text, pos))
            pos += len(text)
    runs = [text for kind, text, _ in chunks if kind == "text"]
    encoded = _encode_plain(tokenizer, runs, controls.values(), offsets=True)
    runs_iter = iter(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for kind, text, start in chunks:
        if kind == "image":
            spans.append((len(input_ids), len(input_ids) + num_query_tokens))
            input_ids += [image_token_id] * num_query_tokens
            labels += [IGNORE_INDEX] * num_query_tokens
            continue
        tokens = zip(*next(runs_iter), strict=True) if kind == "text" else [(controls[text], (0, len(text)))]
        for token_id, (lo, hi) in tokens:
            lo, hi = start + lo, start + max(hi, lo + 1)  # a zero-width token still gets a position
            target = any(lo < t_end and hi > t_begin for t_begin, t_end in layout.targets)
            input_ids.append(token_id)
            labels.append(token_id if target else IGNORE_INDEX)
    return _finish(input_ids, labels, spans, image_token_id, num_query_tokens)


def _check_request(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], image_token_id: int, num_query: int, gen: bool
) -> None:
    """Raise a clear error for malformed messages or arguments."""
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a mapping with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise TypeError(f"message {i}: content must be a str, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if role != "user" and IMAGE_MARKER in content:
            raise ValueError(f"message {i}: {IMAGE_MARKER} is only allowed in user messages, not in a {role} one")
    if gen and messages[-1]["role"] == "assistant":
        raise ValueError("add_generation_prompt=True, but the last message is already an assistant reply")
    if num_query < 1:
        raise ValueError(f"num_query_tokens must be >= 1, got {num_query}")
    if not 0 <= image_token_id < len(tokenizer):
        raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary (size {len(tokenizer)})")


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the tokenizer's chat template writes right after an assistant reply (`<|im_end|>`,
    `<|eot_id|>`, ...), read from the template's output the way labels are; None without a template or when
    the template ends replies with plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    controls = _control_tokens(tokenizer)
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "reply"}]
    layout = template_layout(tokenizer, messages, list(controls))
    (reply_start, reply_end), end = layout.contents[-1], layout.targets[-1][1]
    token = layout.text[reply_end:end]
    return controls.get(token) if end > reply_end and reply_start < reply_end else None


def _control_split(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], re.Pattern]:
    """`_control_tokens` and a pattern splitting text at them, cached per tokenizer and its special tokens (a served
    request renders its prompt with them: building them took a third of that time)."""
    key = (len(tokenizer), tuple(tokenizer.all_special_tokens),
           tuple(token.special for token in tokenizer.added_tokens_decoder.values()))
    cached = _CONTROL_SPLITS.get(tokenizer)
    if cached is None or cached[0] != key:
        controls = _control_tokens(tokenizer)
        # Longest first, as the tokenizer matches added tokens; "(?!)" never matches (a tokenizer without specials).
        alternation = "|".join(re.escape(t) for t in sorted(controls, key=len, reverse=True)) or "(?!)"
        cached = _CONTROL_SPLITS[tokenizer] = (key, controls, re.compile(f"({alternation})"))
    return cached[1], cached[2]


def _control_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Special token string -> id: added tokens flagged special, plus the named/extra special tokens."""
    controls = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    controls.update(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True))
    return controls


def _encode_plain(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], control_ids: Iterable[int], *, offsets: bool = False
) -> Mapping[str, list]:
    """Encode texts in one batch with every special token read as plain text ("<|im_end|>" -> "<", "|", ...).

    transformers applies `split_special_tokens` as a per-call flag on the shared Rust tokenizer, so a special id
    here (a control token flagged non-special, or a concurrent call racing on the flag) raises, never slips by.
    """
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets)
    forbidden = set(control_ids) - {tokenizer.unk_token_id}  # unknown text may map to unk: that is plain text
    for text, ids in zip(texts, encoded["input_ids"], strict=True):
        if leaked := forbidden.intersection(ids):
            raise ValueError(f"text {text[:50]!r} gave special ids {sorted(leaked)} despite split_special_tokens=True")
    return encoded


def _finish(
    input_ids: list[int], labels: list[int], spans: list[tuple[int, int]], image_token_id: int, num_query_tokens: int
) -> RenderedConversation:
    """Check that placeholder ids occur only in the image runs, then package the result."""
    found = input_ids.count(image_token_id)
    if found != len(spans) * num_query_tokens:
        raise ValueError(
            f"{found} placeholder ids ({image_token_id}) for {len(spans)} images x {num_query_tokens}: text or "
            "the template also produced it; the placeholder must be a special token the template never writes"
        )
    return RenderedConversation(input_ids, labels, len(spans), spans)
