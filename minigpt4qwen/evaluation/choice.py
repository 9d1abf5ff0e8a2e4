"""Reading the chosen option out of a free-form answer, by the exact-matching rules of VLMEvalKit (commit
e8e78f05, `can_infer`): first an option letter, then an option's text; nothing else is guessed.

Letter: after replacing `.()[],:;!*#{}` with spaces and splitting on whitespace, exactly one of the option letters
must be a word, and it must be among the answer's last five words (`... so the answer is B`, `B. a dog`, `(C)`).
Several letters, or one too early, fall through to the pattern `answer is X`, then to the text rule. X is an
upper-case A-D standing alone (`answer is **B**.`, not `answer is a cat` nor `answer is Blue`): the one departure
from VLMEvalKit, which takes any case and what follows. A known refusal, or a lone `Z` word with no option letter,
reads as `Z` (never correct).
Text: the answer (lower-cased, at most twice as long as all options together) must contain exactly one option's
text (lower-cased).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

REFUSAL = "Z"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# Departs from VLMEvalKit at e8e78f05, whose pattern (the same with the whole of it case-insensitive and nothing
# after the letter) reads "The answer is a cat." as A and "The answer is blue" as B: the article and the first
# letter of any word would pick an option. Only the words "answer is" ignore case here, and the letter must end a
# word.
_ANSWER_IS = re.compile(r"(?i:(?:correct\s+)?answer\s+is)\s+\**([ABCD])\**(?!\w)")


def option_letter(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter the answer names, "Z" for a refusal, or None."""
    if any(refusal in answer for refusal in _REFUSALS):
        return REFUSAL
    words = answer.translate(_SEPARATORS).split()
    named = [letter for letter in choices if letter in words]
    if len(named) == 1:
        # "A" also is an article: a letter counts only near the end, where answers put their conclusion.
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and REFUSAL in words:
        return REFUSAL
    found = _ANSWER_IS.search(answer)
    if found and found.group(1) in choices:
        return found.group(1)
    return None


def option_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text the answer contains (case-insensitive), or None."""
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(text) for text in choices.values()):
        return None
    hits = [letter for letter, text in choices.items() if text.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def infer_choice(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option the answer chooses (a letter of `choices`, or "Z"), or None when it cannot be read.

    Args:
        answer: the model's raw answer.
        choices: letter -> option text, in letter order.
    """
    return option_letter(answer, choices) or option_text(answer, choices)


def format_options(choices: Mapping[str, str]) -> str:
    """`A. text` lines, one per option (no trailing newline)."""
    return "\n".join(f"{letter}. {text}" for letter, text in choices.items())
