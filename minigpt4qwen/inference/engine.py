"""The chat engine: history, images and generation settings for one conversation, separate from any front end.

    session = ChatSession(model, tokenizer)
    session.add_image("cat.jpg")
    print(session.ask("What is in the picture?"))

Image features are computed once per image (when added) and reused every turn; the prompt is re-rendered from
the messages each turn, dropping the oldest turns when it exceeds `max_window_size` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.data.images import ImageTransform, load_image
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.conversation import IMAGE_MARKER, render_chatml
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

IMAGE_PROMPT = f"<Img>{IMAGE_MARKER}</Img>"  # how the original's data and chat wrap each image


@dataclass
class GenerationSettings:
    """Decoding options (the original's demo defaults: greedy, up to 512 new tokens)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in asdict(self).items() if k != "seed"}
        if not self.do_sample:  # sampling knobs would only trigger transformers warnings in greedy/beam mode
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key)
        return kwargs


class ChatSession:
    """One conversation with a model.

    Args:
        model: the model (eval mode is set here).
        tokenizer: its tokenizer (ChatML special tokens required).
        system_prompt: the system message.
        max_window_size: prompt budget in tokens; older turns are dropped beyond it (the original's 6144).
    """

    def __init__(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, *,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_window_size: int = 6144):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_window_size = max_window_size
        self.transform = ImageTransform(size=model.config.vision_config.image_size, train=False)
        self.turns: list[tuple[str, str]] = []  # (user content with markers, assistant reply)
        self.turn_images: list[list[torch.Tensor]] = []  # features of each turn's images, [Q, H] each
        self.pending_images: list[torch.Tensor] = []  # added, not yet asked about

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    def add_image(self, image: str | Path | Image.Image) -> None:
        """Encodes an image now (once) and attaches it to the next question.

        Raises:
            ImageLoadError: a missing or undecodable file (the session is unchanged).
        """
        pil = load_image(str(image)) if not isinstance(image, Image.Image) else image.convert("RGB")
        pixels = self.transform(pil).unsqueeze(0).to(self.device)
        with torch.no_grad():
            self.pending_images.append(self.model.encode_images(pixels)[0])

    def clear(self) -> None:
        """Forgets the history and every image."""
        self.turns, self.turn_images, self.pending_images = [], [], []

    def clear_history(self) -> None:
        """Forgets the conversation but keeps its images for the next question."""
        self.pending_images = [f for images in self.turn_images for f in images] + self.pending_images
        self.turns, self.turn_images = [], []

    def with_image_markers(self, query: str) -> str:
        """The query with one `<Img><ImageHere></Img>` per pending image in front, unless it places them itself."""
        return query if IMAGE_MARKER in query else IMAGE_PROMPT * len(self.pending_images) + query

    def _messages(self, query: str, first_turn: int) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for user, reply in self.turns[first_turn:]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return messages + [{"role": "user", "content": query}]

    def build_prompt(self, query: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input ids [1, T] for `query` (with its image markers) after the kept history, and the image features
        [N, Q, H] in marker order."""
        all_images = self.turn_images + [self.pending_images]
        for first in range(len(self.turns) + 1):
            rendered = render_chatml(
                self.tokenizer, self._messages(query, first), image_token_id=self.model.image_token_id,
                num_query_tokens=self.model.num_query_tokens, add_generation_prompt=True,
            )
            if len(rendered.input_ids) <= self.max_window_size or first == len(self.turns):
                break
        features = [f for images in all_images[first:] for f in images]
        if rendered.num_images != len(features):
            raise ValueError(f"the prompt has {rendered.num_images} image markers but {len(features)} images were added")
        ids = torch.tensor([rendered.input_ids], device=self.device)
        return ids, (torch.stack(features) if features else None)

    def ask(self, query: str, settings: GenerationSettings | None = None, streamer: Any = None) -> str:
        """Answers `query` (about the images added since the last question, and the history).

        Args:
            query: the user's text; `<ImageHere>` markers place the new images, else they go first.
            settings: decoding options.
            streamer: a transformers streamer (e.g. `TextIteratorStreamer`) receiving tokens as they come.

        Returns:
            The reply text; the turn is added to the history.
        """
        settings = settings or GenerationSettings()
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        query = self.with_image_markers(query)
        ids, features = self.build_prompt(query)
        new = self.model.generate(
            ids, image_features=features, eos_token_id=chat_stop_token_ids(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **settings.generate_kwargs(),
        )
        reply = self.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        self.turns.append((query, reply))
        self.turn_images.append(self.pending_images)
        self.pending_images = []
        return reply


def chat(model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, query: str,
         history: list[tuple[str, str]] | None = None, images: list[str | Path | Image.Image] | None = None,
         settings: GenerationSettings | None = None) -> tuple[str, list[tuple[str, str]]]:
    """One-call chat: answers `query` about `images` after a text-only `history`; returns (reply, new history)."""
    session = ChatSession(model, tokenizer)
    session.turns = list(history or [])
    session.turn_images = [[] for _ in session.turns]
    for image in images or []:
        session.add_image(image)
    reply = session.ask(query, settings)
    return reply, session.turns
