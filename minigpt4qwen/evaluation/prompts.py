"""Prompt templates: each benchmark's question becomes the user message through a `str.format` template whose
fields the benchmark's reader fills in. The template used is recorded in the results.

Image markers are not part of the template: each question's image goes before the text, as in `chat`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from minigpt4qwen.evaluation.questions import Question


def template_fields(template: str) -> set[str]:
    """The field names a template uses.

    Raises:
        ValueError: the template is not a valid `str.format` string, or uses positional / attribute / index fields.
    """
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"prompt template {template!r} is not a valid format string ({err}); write literal "
                         "braces as {{ and }}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"prompt template {template!r}: field {{{name}}} must be a plain name like {{question}}")
    return names


def check_template(template: str, available: Iterable[str], benchmark: str) -> str:
    """Returns `template` after checking it only uses fields the benchmark provides.

    Raises:
        ValueError: an empty template, or an unknown field (the message lists the available ones).
    """
    if not template.strip():
        raise ValueError(f"the prompt template for {benchmark} is empty: every question would be asked as nothing")
    known = set(available)
    unknown = template_fields(template) - known
    if unknown:
        raise ValueError(f"prompt template for {benchmark} uses {sorted(unknown)}, which {benchmark} does not "
                         f"provide; available fields: {sorted(known)}")
    return template


def render(template: str, question: Question) -> str:
    """The user message for one question."""
    return template.format_map(dict(question.fields))
