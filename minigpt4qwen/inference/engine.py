"""The chat engine: history, images and generation settings for one conversation, separate from any front end.

    session = ChatSession(model, tokenizer)
    session.add_image("cat.jpg")
    print(session.ask("What is in the picture?"))

Image features are computed once per image (when added) and reused every turn; the prompt is re-rendered from
the messages each turn, dropping the oldest turns when it exceeds `max_window_size` tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.images import ImageTransform, load_image
from minigpt4qwen.inference.decoding.fast_path import fast_path_applies, generate_fast
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.generation import CancelFlag, GenerationSettings, chat_generate_kwargs, decode_reply
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.conversation import IMAGE_MARKER, render_with_template
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

__all__ = ["IMAGE_PROMPT", "ChatSession", "GenerationCancelled", "GenerationSettings", "chat"]

IMAGE_PROMPT = f"<Img>{IMAGE_MARKER}</Img>"  # how the original's data and chat wrap each image
WORD_JOINER = "\u2060"  # invisible, and no character of a marker: it breaks one without changing what is shown


def inert_markers(reply: str) -> str:
    """A reply as history for the next prompt: an image marker the model wrote becomes plain text (a word joiner
    splits it), so the prompt neither waits for an image there nor refuses a marker outside a user message."""
    return reply.replace(IMAGE_MARKER, IMAGE_MARKER[:1] + WORD_JOINER + IMAGE_MARKER[1:])


class GenerationCancelled(RuntimeError):
    """`ask`/`regenerate` was stopped by `ChatSession.cancel()`; the history and pending images are unchanged.

    Attributes:
        partial: the reply generated before the stop.
    """

    def __init__(self, partial: str) -> None:
        super().__init__("generation cancelled")
        self.partial = partial


class ChatSession:
    """One conversation with a model. Safe to share between threads: one call runs at a time (`lock`), and
    `cancel()` may be called from any thread.

    Args:
        model: the model (eval mode is set here).
        tokenizer: its tokenizer; prompts are rendered with its chat template (`render_with_template`).
        system_prompt: the system message.
        max_window_size: prompt budget in tokens; older turns are dropped beyond it (the original's 6144).
        decoder: the model's `GraphDecoder` (shared by sessions): encodes the images and answers every question
            without beam search (CUDA graphs); None: everything goes through `MiniGPT4Qwen.generate`.
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_window_size: int = 6144,
                 decoder: GraphDecoder | None = None):
        if decoder is not None and decoder.model is not model:
            raise ValueError("the decoder belongs to another model")
        self.model = model.eval()
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_window_size = max_window_size
        self.transform = ImageTransform(size=model.config.vision_config.image_size, train=False)
        self.turns: list[tuple[str, str]] = []  # (user content with markers, assistant reply)
        self.turn_images: list[list[torch.Tensor]] = []  # features of each turn's images, [Q, H] each
        self.pending_images: list[torch.Tensor] = []  # added, not yet asked about
        self.lock = threading.RLock()
        self._cancel = CancelFlag()

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    def _encode(self, image: str | Path | Image.Image) -> torch.Tensor:
        pil = load_image(str(image)) if not isinstance(image, Image.Image) else image.convert("RGB")
        pixels = self.transform(pil).unsqueeze(0).to(self.device)
        with torch.no_grad():
            return (self.decoder or self.model).encode_images(pixels)[0]

    def add_image(self, image: str | Path | Image.Image) -> None:
        """Encodes an image now (once) and attaches it to the next question.

        Args:
            image: a file path or a PIL image.

        Raises:
            ImageLoadError: a missing or undecodable file (the session is unchanged).
        """
        features = self._encode(image)
        with self.lock:
            self.pending_images.append(features)

    def add_turn(self, query: str, reply: str, images: Sequence[str | Path | Image.Image] = ()) -> None:
        """Appends a past exchange to the history (e.g. to rebuild a conversation held elsewhere).

        Args:
            query: the user's text; `images` go first unless it places them with `<ImageHere>` markers.
            reply: the assistant's answer.
            images: that turn's images, encoded now.

        Raises:
            ImageLoadError: an image cannot be read (the session is unchanged).
            ValueError: the query's marker count differs from the number of images.
        """
        features = [self._encode(image) for image in images]
        if IMAGE_MARKER not in query:
            query = IMAGE_PROMPT * len(features) + query
        if query.count(IMAGE_MARKER) != len(features):
            raise ValueError(f"the query has {query.count(IMAGE_MARKER)} image markers but {len(features)} images")
        self.record_turn(query, reply, features)

    def record_turn(self, query: str, reply: str, images: Sequence[torch.Tensor] | None = None, *,
                    replace_last: bool = False) -> None:
        """Adds an answered question to the history (what `ask` does with its reply; front ends that generate
        elsewhere, e.g. through a `GenerationScheduler`, call it with theirs).

        Args:
            query: the question with its image markers (`with_image_markers`).
            reply: the answer.
            images: the features of its images in marker order (default: every pending image); pending ones stop
                being pending, so images added while it was answered wait for the next question.
            replace_last: the reply answers the last question again (see `regenerate_prompt`): it replaces that
                turn.
        """
        with self.lock:
            images = list(self.pending_images if images is None else images)
            if replace_last:
                self.turns.pop()
                self.turn_images.pop()
            self.turns.append((query, reply))
            self.turn_images.append(images)
            self.pending_images = [f for f in self.pending_images if all(f is not image for image in images)]

    def clear(self) -> None:
        """Forgets the history and every image."""
        with self.lock:
            self.turns, self.turn_images, self.pending_images = [], [], []

    def clear_history(self) -> None:
        """Forgets the conversation but keeps its images for the next question."""
        with self.lock:
            self.pending_images = [f for images in self.turn_images for f in images] + self.pending_images
            self.turns, self.turn_images = [], []

    def with_image_markers(self, query: str) -> str:
        """The query with one `<Img><ImageHere></Img>` per pending image in front, unless it places them itself."""
        return query if IMAGE_MARKER in query else IMAGE_PROMPT * len(self.pending_images) + query

    def _messages(self, query: str, first_turn: int) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for user, reply in self.turns[first_turn:]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": inert_markers(reply)}]
        return messages + [{"role": "user", "content": query}]

    def build_prompt(self, query: str, max_window_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input ids [1, T] for `query` (with its image markers) after the kept history, and the image features
        [N, Q, H] in marker order.

        Args:
            query: the question with its image markers.
            max_window_size: this prompt's budget (default: the session's), e.g. smaller to leave a reply room.

        Raises:
            ValueError: the number of image markers differs from the number of images.
        """
        window = self.max_window_size if max_window_size is None else min(max_window_size, self.max_window_size)
        all_images = self.turn_images + [self.pending_images]
        for first in range(len(self.turns) + 1):
            rendered = render_with_template(
                self.tokenizer, self._messages(query, first), image_token_id=self.model.image_token_id,
                num_query_tokens=self.model.num_query_tokens, add_generation_prompt=True,
            )
            if len(rendered.input_ids) <= window or first == len(self.turns):
                break
        features = [f for images in all_images[first:] for f in images]
        if rendered.num_images != len(features):
            raise ValueError(
                f"the prompt has {rendered.num_images} image markers but {len(features)} images were added")
        ids = torch.tensor([rendered.input_ids], device=self.device)
        return ids, (torch.stack(features) if features else None)

    def regenerate_prompt(self, max_window_size: int | None = None
                          ) -> tuple[str, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """What `regenerate` answers, for generating elsewhere: the last question (with its markers), its images'
        features, and `build_prompt`'s ids and features for it after the history before it (`max_window_size` as
        there). The session is unchanged; record the new reply with `record_turn(query, reply, images,
        replace_last=True)`.

        Raises:
            ValueError: no question has been answered yet.
        """
        with self.lock:
            if not self.turns:
                raise ValueError("nothing to regenerate: no question has been answered yet")
            kept = self.turns, self.turn_images, self.pending_images
            (query, _), images = self.turns[-1], self.turn_images[-1]
            self.turns, self.turn_images, self.pending_images = self.turns[:-1], self.turn_images[:-1], images
            try:
                return query, images, *self.build_prompt(query, max_window_size)
            finally:
                self.turns, self.turn_images, self.pending_images = kept

    def cancel(self) -> None:
        """Stops the generation running now (from any thread); its `ask` raises `GenerationCancelled`."""
        self._cancel.set()

    def ask(self, query: str, settings: GenerationSettings | None = None, streamer: Any = None) -> str:
        """Answers `query` (about the images added since the last question, and the history).

        Args:
            query: the user's text; `<ImageHere>` markers place the new images, else they go first.
            settings: decoding options.
            streamer: a transformers streamer (e.g. `TextIteratorStreamer`) receiving tokens as they come; with
                beam search it receives the whole reply at the end. It is always ended, even on an error.

        Returns:
            The reply text; the turn is added to the history.

        Raises:
            GenerationCancelled: `cancel()` stopped it (nothing is added to the history).
            ValueError: invalid settings, or a marker count that differs from the number of pending images.
        """
        settings = settings or GenerationSettings()
        with self.lock:
            query = self.with_image_markers(query)
            reply = self._generate(query, settings, streamer)
            self.record_turn(query, reply)
            return reply

    def regenerate(self, settings: GenerationSettings | None = None, streamer: Any = None) -> str:
        """Answers the last question again (e.g. with other settings), replacing the last reply.

        Images added since that question stay pending for the next one. Args, Returns and Raises as `ask`;
        on an error the previous reply is kept.

        Raises:
            ValueError: no question has been answered yet.
        """
        with self.lock:
            if not self.turns:
                raise ValueError("nothing to regenerate: no question has been answered yet")
            last_turn, last_images = self.turns.pop(), self.turn_images.pop()
            pending, self.pending_images = self.pending_images, last_images
            try:
                return self.ask(last_turn[0], settings, streamer)
            except BaseException:
                self.turns.append(last_turn)
                self.turn_images.append(last_images)
                raise
            finally:
                self.pending_images = pending

    def _generate(self, query: str, settings: GenerationSettings, streamer: Any) -> str:
        try:
            settings.check()
            # Cleared before the prompt is built (its images encoded): a cancel from then on stops this request.
            self._cancel.clear()
            ids, features = self.build_prompt(query)
            if self._cancel.fired:
                raise GenerationCancelled("")
            beams = settings.num_beams > 1  # transformers cannot stream beam search
            if self.decoder is not None and fast_path_applies(settings):  # seeds after its graph captures
                new = generate_fast(self.decoder, self.tokenizer, ids, features, settings, self._cancel, streamer)
            else:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                new = self.model.generate(ids, image_features=features, streamer=None if beams else streamer,
                                          **chat_generate_kwargs(self.tokenizer, settings, (self._cancel,)))
        except BaseException:
            if streamer is not None:  # a consumer iterating the streamer would otherwise wait forever
                streamer.end()
            raise
        if beams and streamer is not None:  # the way generate feeds a streamer: the (empty) prompt, then tokens
            streamer.put(ids[:, :0].cpu())
            streamer.put(new[:1].cpu())
            streamer.end()
        reply = decode_reply(self.tokenizer, new[0], settings.stop)
        if self._cancel.fired:
            raise GenerationCancelled(reply)
        return reply


def chat(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, query: str,
         history: list[tuple[str, str]] | None = None, images: list[str | Path | Image.Image] | None = None,
         settings: GenerationSettings | None = None, decoder: GraphDecoder | None = None,
         ) -> tuple[str, list[tuple[str, str]]]:
    """One-call chat: answers `query` about `images` after a text-only `history`.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        query: the question.
        history: earlier (question, reply) pairs as returned by a previous call (questions keep their image
            markers).
        images: every image of the conversation in order: first the ones the history's markers refer to, then
            this question's (so a follow-up call passes the same list, plus any new images).
        settings: decoding options.
        decoder: the model's CUDA-graph decoder (see `ChatSession`).

    Returns:
        (reply, the history with this turn appended).
    """
    session = ChatSession(model, tokenizer, decoder=decoder)
    images = list(images or [])
    needed = sum(user.count(IMAGE_MARKER) for user, _ in history or [])
    if needed > len(images):
        raise ValueError(f"the history refers to {needed} images but {len(images)} were given; pass the "
                         "conversation's images in order, the earlier turns' first")
    used = 0
    for user, reply in history or []:
        count = user.count(IMAGE_MARKER)
        session.add_turn(user, reply, images[used : used + count])
        used += count
    for image in images[used:]:
        session.add_image(image)
    reply = session.ask(query, settings)
    return reply, session.turns
