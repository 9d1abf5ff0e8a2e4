"""Whether a question fits a `ChatSession`'s prompt budget, checked by the chat front ends before generating.

`ChatSession` drops the oldest turns to keep the prompt within `max_window_size` tokens, but the new question
itself is always sent whole. A question that alone overflows the budget is refused here, with a message that
says how long it is and what the limit is, rather than run past the budget the user chose.
"""

from __future__ import annotations

from minigpt4qwen.inference.engine import ChatSession
from minigpt4qwen.text.conversation import render_with_template


def question_tokens(session: ChatSession, query: str) -> int:
    """Prompt tokens `query` needs with no history: the system message, the question with the images waiting for
    it (their placeholder tokens included) and the assistant header.

    Args:
        session: the conversation (its system prompt and pending images count).
        query: the user's text, as it would be passed to `session.ask`.

    Returns:
        The token count.
    """
    messages = [{"role": "system", "content": session.system_prompt},
                {"role": "user", "content": session.with_image_markers(query)}]
    rendered = render_with_template(session.tokenizer, messages, image_token_id=session.model.image_token_id,
                                    num_query_tokens=session.model.num_query_tokens, add_generation_prompt=True)
    return len(rendered.input_ids)


def over_budget(session: ChatSession, query: str, option: str = "--max-window-size") -> str | None:
    """Why `query` cannot be asked in `session`, or None when it fits the prompt budget.

    Args:
        session: the conversation.
        query: the user's text.
        option: how the front end's user sets the budget (named in the message).

    Returns:
        A message naming the question's length and the limit, or None.
    """
    needed = question_tokens(session, query)
    if needed <= session.max_window_size:
        return None
    return (f"question not sent: it is {len(query):,} characters, {needed:,} tokens with the system prompt and its "
            f"{len(session.pending_images)} image(s), over the prompt budget of {session.max_window_size:,} tokens "
            f"({option}); shorten it, or restart with a larger {option}")
