"""Decoding options and the stopping criteria the chat engine adds to `generate`.

`GenerationSettings` holds what a user may change (greedy, sampling, beams, stop strings, seed) and parses
`key=value` text safely, with type and range checks. `CancelFlag` stops a running generation from another thread;
`StopOnText` stops at any of the stop strings, which `trim_at_stop` then cuts from the reply.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from minigpt4qwen.checkpoint.export import chat_stop_token_ids

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
SPECIAL_TOKENS_ALLOWED = 8  # skipped special tokens a stop string may span and still be seen (`StopOnText`)


@dataclass
class GenerationSettings:
    """Decoding options (the original's demo defaults: greedy, up to 512 new tokens).

    Attributes:
        stop: strings that end the reply (not included in it), on top of the ChatML stop tokens.
        seed: seeds torch before each generation (None: not reseeded).
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `generate` (`seed` and `stop` are applied by the engine instead)."""
        kwargs = {k: v for k, v in asdict(self).items() if k not in ("seed", "stop")}
        for key in ("temperature", "top_p", "repetition_penalty"):  # transformers refuses an int (2 for 2.0)
            kwargs[key] = float(kwargs[key])
        if not self.do_sample:  # sampling knobs would only trigger transformers warnings in greedy/beam mode
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key)
        return kwargs

    def check(self) -> GenerationSettings:
        """Returns self after checking every value's type and range.

        Raises:
            ValueError: a value of the wrong type or out of range (the message names the field).
        """
        hints = typing.get_type_hints(GenerationSettings)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _has_type(value, hints[field.name]):
                raise ValueError(f"{field.name} must be {_type_name(hints[field.name])}, got {value!r}")
        rules = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        return self

    def with_text(self, key: str, text: str) -> GenerationSettings:
        """A copy with field `key` set from its text form, e.g. ("temperature", "0.7"); nothing is evaluated.

        Text forms: ints and floats as Python writes them; booleans true/false/yes/no/on/off/1/0; `none` for an
        unset seed; stop strings as one string (blanks kept) or a JSON list of strings (an empty text clears them).

        Args:
            key: a field name.
            text: its new value as text.

        Returns:
            The updated, checked copy (self is unchanged).

        Raises:
            ValueError: an unknown field, or text that is not a valid value for it.
        """
        hints = typing.get_type_hints(GenerationSettings)
        if key not in hints:
            raise ValueError(f"unknown setting {key!r}; settings: {', '.join(hints)}")
        # A stop string is taken as given: "\n" or " " are stops; other values ignore surrounding blanks.
        value = _parse(key, text if hints[key] == tuple[str, ...] else text.strip(), hints[key])
        return dataclasses.replace(self, **{key: value}).check()


def _parse(key: str, text: str, hint: Any) -> Any:
    """`text` converted to the field type `hint`."""
    lowered = text.lower()
    if hint is bool:
        if lowered in _TRUE + _FALSE:
            return lowered in _TRUE
    elif hint in (int, int | None):
        if hint is not int and lowered in ("none", "null", ""):
            return None
        try:
            return int(text)
        except ValueError:
            pass
    elif hint is float:
        try:
            value = float(text)
            if math.isfinite(value):
                return value
        except ValueError:
            pass
    elif hint == tuple[str, ...]:
        if not text.startswith("["):
            return (text,) if text else ()
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{key}: not a JSON list of strings ({err})") from None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return tuple(items)
    raise ValueError(f"{key} must be {_type_name(hint)}, got {text!r}")


def _has_type(value: Any, hint: Any) -> bool:
    if hint == tuple[str, ...]:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint == int | None:
        return value is None or _has_type(value, int)
    if hint is float:  # an int is a fine float (JSON and sliders give 1 for 1.0); a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", int | None: "an integer or none",
             tuple[str, ...]: "a string or a JSON list of strings"}
    return names[hint]


class CancelFlag(StoppingCriteria):
    """A stopping criterion another thread can raise: `set()` ends the generation after the current step.

    Attributes:
        fired: whether it stopped a generation (as opposed to being set after the generation ended).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.fired = False

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()
        self.fired = False

    def poll(self) -> bool:
        """Whether it is set (and, if so, marks it as having stopped the generation)."""
        stop = self._event.is_set()
        self.fired = self.fired or stop
        return stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.poll(), dtype=torch.bool, device=input_ids.device)


class StopOnText(StoppingCriteria):
    """Stops each sequence once its generated text contains one of `stops` (checked on a decoded tail, so it
    works for any tokenizer, whatever the token boundaries).

    Args:
        tokenizer: decodes the ids.
        stops: the stop strings (non-empty).
        prompt_length: leading ids of `input_ids` that are the prompt (0 when generating from embeddings).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...], prompt_length: int = 0) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        # Enough last tokens to cover the longest stop string: a byte-level token may hold one byte of a character
        # (4 at most in UTF-8), and skipped special tokens decode to nothing (a few are allowed for).
        self.tail = 4 * max(len(s) for s in stops) + SPECIAL_TOKENS_ALLOWED

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]
        texts = self.tokenizer.batch_decode(generated[:, -self.tail:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def trim_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` cut before the first occurrence of any stop string.

    Args:
        text: a decoded reply.
        stops: the stop strings.

    Returns:
        The text up to (not including) the earliest stop string, or all of it.
    """
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def chat_generate_kwargs(tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings,
                         criteria: tuple[StoppingCriteria, ...] = ()) -> dict[str, Any]:
    """Everything `MiniGPT4Qwen.generate` needs besides the inputs: ChatML stop ids, pad id, stopping criteria
    (`criteria` plus the settings' stop strings) and the decoding options.

    Args:
        tokenizer: the model's tokenizer.
        settings: checked decoding options.
        criteria: extra stopping criteria (e.g. a `CancelFlag`).

    Returns:
        Keyword arguments for `generate` (without `streamer`).
    """
    stop_ids = chat_stop_token_ids(tokenizer)
    stopping = StoppingCriteriaList(criteria)
    if settings.stop:
        stopping.append(StopOnText(tokenizer, settings.stop))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    return {"eos_token_id": list(stop_ids), "pad_token_id": pad, "stopping_criteria": stopping,
            **settings.generate_kwargs()}


def decode_reply(tokenizer: PreTrainedTokenizerBase, new_ids: torch.Tensor, stops: tuple[str, ...] = ()) -> str:
    """The reply text of one row of generated ids: special tokens dropped, cut at a stop string, stripped.

    Args:
        tokenizer: the model's tokenizer.
        new_ids: [new] generated ids (padding and stop ids included).
        stops: the settings' stop strings.

    Returns:
        The reply.
    """
    return trim_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), stops).strip()


class StopTrimmer:
    """Turns streamed text into the pieces a client may see: no leading/trailing blanks, nothing from a stop on.

    Trailing whitespace and a tail that could begin a stop string are held back until later text settles them.

    Args:
        stop: stop strings (empty ones are ignored).
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> str:
        """Adds `piece`; returns the newly releasable text (all that is left when `final`)."""
        if self.stopped:
            return ""
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        pending = len(self.text) - self._partial_stop_length()  # where an unfinished stop string may begin
        # A stop found after the start of an unfinished one is not final yet: the earlier one may still complete,
        # and the reply is cut at the earliest stop (`trim_at_stop`).
        if cuts and (final or min(cuts) <= pending):
            self.stopped, end = True, min(cuts)
        else:
            end = len(self.text) if final else pending
        end = len(self.text[:end].rstrip())
        start = max(self.emitted, len(self.text) - len(self.text.lstrip()))
        self.emitted = max(self.emitted, end)
        return self.text[start:end]

    def _partial_stop_length(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
