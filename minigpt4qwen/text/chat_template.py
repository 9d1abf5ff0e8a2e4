"""Where a chat template puts each message's content, and which characters of its output are learned.

`template_layout` renders the conversation with the tokenizer's own chat template and returns the string with the
character span of every message's content and the spans to supervise, derived from the template output alone:

- Content spans: the template is rendered once with each content replaced by a unique stand-in, which cuts its
  output into the frames around the contents (whatever the template adds: headers, default system prompts,
  dates, empty think blocks); the real rendering must be those frames around the real contents, each content
  as given or trimmed of surrounding whitespace as some templates do (Llama 3's `| trim`).
- Targets: where the template marks assistant text with `{% generation %}`, exactly those spans (transformers'
  assistant-mask rendering); otherwise each assistant content through the first special token after it, which is
  its end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...).
- Generation prompts are the template's own frame before an assistant reply: the conversation is rendered with
  an empty reply appended and cut where its content starts. So the prompt equals what the model saw before every
  trained reply (for Qwen3 the empty think block, as with `enable_thinking=False`).
"""

from __future__ import annotations

import re
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

# tokenizer -> {(chat template, messages less contents): frames}, oldest first; see `_frames`.
_FRAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
FRAMES_PER_TOKENIZER = 64
_FRAMES_LOCK = threading.Lock()

# The tag transformers' assistant masks are made from.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TemplateLayout:
    """A conversation as its chat template renders it.

    Attributes:
        text: the template's output (up to the start of the reply for a generation prompt).
        contents: per message, the [start, end) character span of its content in `text`.
        targets: [start, end) character spans to supervise, in order.
    """

    text: str
    contents: list[tuple[int, int]]
    targets: list[tuple[int, int]]


def template_layout(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    control_tokens: Sequence[str],
    *,
    add_generation_prompt: bool = False,
) -> TemplateLayout:
    """Render `messages` with the tokenizer's chat template and locate contents and targets in the output.

    Args:
        tokenizer: a tokenizer with a `chat_template`.
        messages: role/content mappings (the contents may hold image markers: they are plain text here).
        control_tokens: the tokenizer's special token strings (ends of turn are looked for among them).
        add_generation_prompt: end the text where the template starts the next assistant reply's content.

    Returns:
        The layout.

    Raises:
        ValueError: the template drops, repeats or reorders contents, or rewrites one beyond trimming whitespace.
    """
    msgs = [dict(m) for m in messages]
    if add_generation_prompt:
        msgs.append({"role": "assistant", "content": ""})
    text, marked = _render(tokenizer, msgs)
    frames = _frames(tokenizer, msgs)
    try:
        contents = _locate_contents(text, msgs, frames)
    except ValueError:  # cached frames may be stale (a template that writes today's date, new special tokens)
        frames = _frames(tokenizer, msgs, fresh=True)
        contents = _locate_contents(text, msgs, frames)
    if marked is None:
        targets = _replies_through_end_of_turn(msgs, text, contents, frames, control_tokens)
    else:
        targets = [(start, end) for start, end in marked if end > start]
    if add_generation_prompt:
        cut = contents.pop()[0]
        text = text[:cut]
        targets = [(start, min(end, cut)) for start, end in targets if start < cut]
    return TemplateLayout(text, contents, targets)


def _locate_contents(text: str, msgs: list[dict[str, str]], frames: list[str]) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered `text`, between the template's `frames`."""
    contents: list[tuple[int, int]] = []
    pos = 0
    for i, message in enumerate(msgs):
        if not text.startswith(frames[i], pos):
            raise _rewritten(i)
        pos += len(frames[i])
        content = _emitted_form(message["content"], text, pos, frames[i + 1], last=i == len(msgs) - 1)
        if content is None:
            raise _rewritten(i)
        contents.append((pos, pos + len(content)))
        pos += len(content)
    return contents


def _frames(tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]], fresh: bool = False) -> list[str]:
    """The template's output around the message contents: len(msgs) + 1 strings.

    Cached per tokenizer, template and messages less their contents (the contents are stand-ins), the last
    `FRAMES_PER_TOKENIZER` of them: what else the template reads (the date, special tokens) can make an entry
    stale, which `template_layout` finds (the frames do not match the text) and renders `fresh`.
    """
    key = (tokenizer.get_chat_template(), repr([sorted((k, v) for k, v in m.items() if k != "content") for m in msgs]))
    with _FRAMES_LOCK:  # served requests render from several threads
        frames = None if fresh else _FRAMES.setdefault(tokenizer, {}).get(key)
    if frames is None:
        frames = _render_frames(tokenizer, msgs)
        with _FRAMES_LOCK:
            cache = _FRAMES.setdefault(tokenizer, {})
            cache.pop(key, None)
            cache[key] = frames
            while len(cache) > FRAMES_PER_TOKENIZER:
                del cache[next(iter(cache))]  # the oldest entry
    return frames


def _render_frames(tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]]) -> list[str]:
    # Private-use delimiters around a decimal nonce: no message text contains it, and case or whitespace
    # filters leave it intact (so such filters are reported as rewriting the content, below).
    nonce = uuid.uuid4().int
    stand_ins = [dict(m, content=f"\ue000{nonce}.{i}\ue001") for i, m in enumerate(msgs)]
    rendered = tokenizer.apply_chat_template(stand_ins, tokenize=False)
    parts = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", rendered)
    order = [int(i) for i in parts[1::2]]
    if order != list(range(len(msgs))):
        raise ValueError(f"the chat template must render each of the {len(msgs)} contents once, in order: {order}")
    return parts[0::2]


def _render(tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]]) -> tuple[str, list | None]:
    """The template's output, and the character spans its `{% generation %}` blocks mark (None without any)."""
    template = tokenizer.get_chat_template()
    if not _GENERATION_TAG.search(template):
        return tokenizer.apply_chat_template(msgs, tokenize=False), None
    # The same variables apply_chat_template gives the template: the special tokens (bos_token, ...).
    texts, spans = render_jinja_template(
        [msgs], chat_template=template, return_assistant_tokens_mask=True, **tokenizer.special_tokens_map
    )
    return texts[0], list(spans[0])


def _emitted_form(content: str, text: str, pos: int, after: str, *, last: bool) -> str | None:
    """`content` as the template wrote it at `pos` (as given, else trimmed of whitespace), followed by `after`."""
    forms = (content, content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"),
             content.lstrip("\n"), content.rstrip("\n"))
    for form in dict.fromkeys(forms):
        if text.startswith(form + after, pos) and (not last or pos + len(form) + len(after) == len(text)):
            return form
    return None


def _replies_through_end_of_turn(
    msgs: list[dict[str, str]], text: str, contents: list[tuple[int, int]], frames: list[str],
    control_tokens: Sequence[str],
) -> list[tuple[int, int]]:
    """Each assistant content through the first special token that the template writes after it (just the
    content where none follows, as in a template that ends turns with plain text)."""
    targets = []
    for i, (message, (start, end)) in enumerate(zip(msgs, contents, strict=True)):
        if message["role"] != "assistant":
            continue
        # The earliest special token; at equal positions the longest, as the tokenizer matches them.
        found = [(frames[i + 1].find(t), -len(t)) for t in control_tokens if t in frames[i + 1]]
        if found:
            offset, neg_length = min(found)
            end += offset - neg_length
        targets.append((start, end))
    return targets


def _rewritten(i: int) -> ValueError:
    return ValueError(
        f"the chat template rewrites message {i}'s content beyond trimming whitespace (or renders it in another "
        "context than the rest), so its tokens cannot be located exactly; pass the content in the form the "
        "template emits it"
    )
