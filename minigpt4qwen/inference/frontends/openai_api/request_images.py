"""The images of a chat-completions request: decoded from data: URIs (or local files, where allowed) and checked
against the server's limits before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from minigpt4qwen.inference.frontends.openai_api.errors import RequestError

_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass
class ImageLimits:
    """What a request may bring: how many images, how many pixels each, and whether local paths are read."""

    max_images: int = 8
    max_pixels: int = 25_000_000
    allow_local_files: bool = False


def decode_image(url: str, limits: ImageLimits, where: str) -> Image.Image:
    """Decodes an `image_url`: a `data:image/...;base64,` URI, or a local path / file:// URL when allowed.

    Args:
        url: the part's URL.
        limits: the server's limits.
        where: the part's place in the request, for error messages.

    Returns:
        The RGB image.

    Raises:
        RequestError: anything else, or bytes that are not a decodable image of acceptable size.
    """
    if url.startswith("data:"):
        match = _DATA_URI.fullmatch(url)
        if not match or not match["mime"].lower().startswith("image/") or ";base64" not in match["params"].lower():
            mime = match["mime"] if match else "?"
            raise RequestError(f"{where}: expected a data:image/...;base64 URI, got media type {mime!r}", param=where)
        try:
            raw = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data URI is not valid base64", param=where) from None
        return _open_checked(io.BytesIO(raw), limits, where)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise RequestError(f"{where}: remote image URLs are not fetched; send the image as a data: URI", param=where)
    if not limits.allow_local_files:
        raise RequestError(f"{where}: local image paths are disabled on this server (start it with "
                           "--allow-local-files) - send the image as a data: URI", param=where)
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if not Path(path).is_file():
        raise RequestError(f"{where}: no such image file: {path}", param=where)
    return _open_checked(path, limits, where)


def _open_checked(source: str | io.BytesIO, limits: ImageLimits, where: str) -> Image.Image:
    try:
        with Image.open(source) as image:  # reads the header only: a huge image is refused before it is decoded
            if image.width * image.height > limits.max_pixels:
                raise RequestError(f"{where}: an image of {image.width}x{image.height} pixels is above the limit of "
                                   f"{limits.max_pixels}", param=where)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(f"{where}: not a decodable image ({type(err).__name__})", param=where) from None
