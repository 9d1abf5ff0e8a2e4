"""The OpenAI chat-completions request, validated and turned into a prompt (for the scheduler) or a fresh
`ChatSession` (for beam search) for one request.

Messages keep their order: system text becomes the system prompt, each image part becomes an
`<Img><ImageHere></Img>` marker where it appears in its user message, and earlier user/assistant pairs become the
session's history, so a request reproduces what `ChatSession.ask` answers for the same conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from minigpt4qwen.data.images import ImageTransform
from minigpt4qwen.inference.decoding.graph_decoder import GraphDecoder
from minigpt4qwen.inference.engine import IMAGE_PROMPT, ChatSession, GenerationSettings, inert_markers
from minigpt4qwen.inference.frontends.openai_api.errors import RequestError
from minigpt4qwen.inference.frontends.openai_api.request_images import ImageLimits, decode_image
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.conversation import IMAGE_MARKER, render_with_template
from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted for compatibility; every image is resized to the vision tower's size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class ChatRequest(BaseModel):
    """The fields of `POST /v1/chat/completions` this server reads; unknown fields are ignored.

    `top_k`, `repetition_penalty` and `num_beams` are extensions (send them with the openai client's `extra_body`).
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's SDKs may send any optional field as null: null means the default.
    stream: bool | None = False
    stream_options: dict[str, bool | None] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=1, ge=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    num_beams: int | None = Field(default=None, ge=1, le=8)

    @property
    def streams(self) -> bool:
        """Whether the reply is streamed (`stream` null means no)."""
        return bool(self.stream)

    @property
    def usage_in_stream(self) -> bool:
        """Whether a stream ends with a usage chunk (`stream_options.include_usage`)."""
        return bool((self.stream_options or {}).get("include_usage"))

    def settings(self, default_max_tokens: int, max_tokens_limit: int) -> GenerationSettings:
        """Decoding options: greedy unless temperature > 0 or top_p < 1 asks for sampling (temperature 0 is greedy).

        Args:
            default_max_tokens: max_new_tokens when the request sets no max_tokens.
            max_tokens_limit: the largest max_tokens accepted.

        Returns:
            The checked settings, stop strings included.

        Raises:
            RequestError: n > 1, more than 4 stop strings, or max_tokens above the server's limit.
        """
        if self.n not in (1, None):
            raise RequestError("n: only n=1 is supported", param="n")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop: at most 4 stop strings", param="stop")
        name = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        if max_tokens > max_tokens_limit:
            raise RequestError(f"{name}: {max_tokens} is above this server's limit of {max_tokens_limit}", param=name)
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise RequestError("seed: must fit 64 bits (a signed integer)", param="seed")
        sample = (self.temperature or 0) > 0 or (self.temperature is None and (self.top_p or 1) < 1)
        settings = GenerationSettings(
            max_new_tokens=max_tokens, do_sample=sample, temperature=self.temperature or 1.0, top_p=self.top_p or 1.0,
            top_k=self.top_k or 0, num_beams=self.num_beams or 1, repetition_penalty=self.repetition_penalty or 1.0,
            # OpenAI takes any signed 64-bit seed, ours are in [0, 2**63): a negative one is taken modulo 2**63.
            seed=None if self.seed is None else self.seed % 2**63, stop=tuple(s for s in stops if s),
        )
        try:
            return settings.check()
        except ValueError as err:
            raise RequestError(str(err)) from None


@dataclass(frozen=True)
class PromptSpec:
    """What building a prompt needs of the model (so a front-end process without it can build prompts)."""

    image_token_id: int
    num_query_tokens: int
    image_size: int

    @classmethod
    def of(cls, model: MiniGPT4Qwen) -> PromptSpec:
        """The model's."""
        return cls(model.image_token_id, model.num_query_tokens, model.config.vision_config.image_size)


@dataclass
class Conversation:
    """A request's conversation: history pairs with their images, then the question with its images."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    turns: list[tuple[str, str]] = field(default_factory=list)
    turn_images: list[list[Image.Image]] = field(default_factory=list)
    query: str = ""
    query_images: list[Image.Image] = field(default_factory=list)

    def prompt(self, spec: PromptSpec, tokenizer: PreTrainedTokenizerBase, max_window_size: int = 6144
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ids [1, T] and pixel values [N, 3, S, S] (None without images) of the prompt a fresh
        `session(...).ask(self.query)` sends, images not yet encoded (the scheduler encodes them in batches).

        The oldest turns are dropped while the prompt exceeds `max_window_size` tokens, as `ChatSession` does.
        """
        images = [*self.turn_images, self.query_images]
        for first in range(len(self.turns) + 1):
            messages = [{"role": "system", "content": self.system_prompt}]
            for user, reply in self.turns[first:]:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": inert_markers(reply)}]
            rendered = render_with_template(tokenizer, [*messages, {"role": "user", "content": self.query}],
                                            image_token_id=spec.image_token_id,
                                            num_query_tokens=spec.num_query_tokens, add_generation_prompt=True)
            if len(rendered.input_ids) <= max_window_size or first == len(self.turns):
                break
        kept = [image for turn in images[first:] for image in turn]
        transform = ImageTransform(size=spec.image_size, train=False)
        pixels = torch.stack([transform(image) for image in kept]) if kept else None
        return torch.tensor([rendered.input_ids]), pixels

    def resized(self, size: int) -> Conversation:
        """This conversation with its images already at the model's `size` x `size` (as the eval transform resizes
        them, so the pixels it then computes are the same): small to send to another process."""
        def shrink(images: list[Image.Image]) -> list[Image.Image]:
            return [image.resize((size, size), Image.Resampling.BICUBIC) for image in images]

        return replace(self, turn_images=[shrink(images) for images in self.turn_images],
                       query_images=shrink(self.query_images))

    def session(self, model: MiniGPT4Qwen, tokenizer: PreTrainedTokenizerBase, max_window_size: int = 6144,
                decoder: GraphDecoder | None = None) -> ChatSession:
        """A fresh session holding this history, its images encoded, and the question's images pending.

        Encodes images with the model, so call it under the generation lock.

        Args:
            model: the model.
            tokenizer: its tokenizer.
            max_window_size: prompt budget in tokens.
            decoder: the model's CUDA-graph decoder, or None.

        Returns:
            The session, ready for `ask(self.query)`.
        """
        session = ChatSession(model, tokenizer, system_prompt=self.system_prompt, max_window_size=max_window_size,
                              decoder=decoder)
        for (query, reply), images in zip(self.turns, self.turn_images, strict=True):
            session.add_turn(query, reply, images)
        for image in self.query_images:
            session.add_image(image)
        return session


def build_conversation(request: ChatRequest, limits: ImageLimits) -> Conversation:
    """Turns the request's messages into a `Conversation`, decoding (and checking) every image.

    Consecutive messages of one role are joined with a newline; after the system messages the conversation must
    start with a user message and end with one.

    Args:
        request: the validated request.
        limits: the server's limits on images.

    Returns:
        The conversation, images decoded (not yet encoded by the model).

    Raises:
        RequestError: a misplaced role or image, a typed `<ImageHere>`, too many or bad images.
    """
    system: list[str] = []
    merged: list[tuple[str, str, list[Image.Image]]] = []  # (role, content with markers, images)
    count = 0
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        parts = content if isinstance(content, list) else [TextPart(type="text", text=content or "")]
        text, images = "", []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                if IMAGE_MARKER in part.text and role != "assistant":  # a reply's own is text (`inert_markers`)
                    raise RequestError(f"{where}: the text may not contain {IMAGE_MARKER}; send images as image_url "
                                       "parts", param=where)
                text += part.text
                continue
            if role != "user":
                raise RequestError(f"{where}: images are only allowed in user messages", param=where)
            count += 1
            if count > limits.max_images:
                raise RequestError(f"too many images: at most {limits.max_images} per request", param=where)
            images.append(decode_image(part.image_url.url, limits, f"{where}.image_url"))
            text += IMAGE_PROMPT
        if role == "system":
            if merged:
                raise RequestError(f"messages[{i}]: system messages must come before the conversation",
                                   param="messages")
            system.append(text)
        elif merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n" + text, merged[-1][2] + images)
        else:
            merged.append((role, text, images))
    if not merged or merged[0][0] != "user":
        raise RequestError("messages: the conversation must start with a user message", param="messages")
    if merged[-1][0] != "user":
        raise RequestError("messages: the last message must be from the user", param="messages")
    conversation = Conversation(system_prompt="\n".join(system) if system else DEFAULT_SYSTEM_PROMPT,
                                query=merged[-1][1], query_images=merged[-1][2])
    for (_, user, images), (_, reply, _) in zip(merged[:-1:2], merged[1:-1:2], strict=True):
        conversation.turns.append((user, reply))
        conversation.turn_images.append(images)
    return conversation
