"""Image loading and the original's BLIP-2 transforms, in PIL + torch (torchvision breaks beside CPU torch 2.13).

Train: RandomResizedCrop (area scale 0.5-1.0, aspect 3/4-4/3, bicubic) + horizontal flip + CLIP normalisation;
eval: bicubic resize to a square + CLIP normalisation. Randomness comes only from the `torch.Generator` passed
in, so a sample's augmentation is reproducible whatever worker or process draws it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Greyscale modes wider than 8 bits (16-bit PNGs open as "I;16", or "I" in older Pillow): PIL's convert("RGB")
# clips their values at 255, so 40000 of 65535 would turn white.
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageLoadError(OSError):
    """An image that is missing or cannot be decoded; the message names the file.

    Attributes:
        path: the image file.
        kind: "missing_image" (absent or unreadable: the detail says which) or "corrupt_image".
    """

    def __init__(self, path: str, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {path}: {detail}")
        self.path, self.kind, self.detail = path, kind, detail

    def __reduce__(self) -> tuple:
        # Must survive the trip from a DataLoader worker to the main process.
        return (ImageLoadError, (self.path, self.kind, self.detail))


def load_image(path: str) -> Image.Image:
    """Open an image fully decoded, as RGB.

    Args:
        path: the image file.

    Returns:
        The RGB image.

    Raises:
        ImageLoadError: the file is missing, a directory or not readable (kind "missing_image", the reason in
            its detail), or not a decodable image ("corrupt_image").
    """
    try:
        # PIL decodes lazily: convert() forces the full decode here, so a truncated file fails now.
        with Image.open(path) as image:
            return to_rgb(image)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageLoadError(path, "missing_image", "no such file") from None
    # Opening fails before any byte is decoded: the file's contents are not at fault, so "corrupt" would mislead.
    except IsADirectoryError:
        raise ImageLoadError(path, "missing_image", "a directory, not an image file") from None
    except PermissionError as err:
        raise ImageLoadError(path, "missing_image", f"unreadable: permission denied ({err.strerror})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, "corrupt_image", f"cannot decode it ({type(err).__name__}: {err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; wide greyscale maps its 16-bit range (0-65535) linearly onto 0-255.

    Args:
        image: any PIL image.

    Returns:
        The RGB image.
    """
    if image.mode not in WIDE_GREY_MODES:
        return image.convert("RGB")
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    # 65535 / 255 = 257 exactly: rounded division maps 0 -> 0 and 65535 -> 255.
    grey = ((values + 128) // 257).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """An int in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator).item())


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """Pick the crop of RandomResizedCrop (Inception-style): a random area fraction and log-uniform aspect.

    Up to 10 draws are tried; if none fits inside the image, the largest centred crop whose aspect is within
    `ratio` is used.

    Args:
        width: image width.
        height: image height.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop's width / height.
        generator: the random source.

    Returns:
        (left, top, right, bottom) of the crop in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = _randint(height - h, generator), _randint(width - w, generator)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """The original's train or eval image transform, PIL RGB image -> normalised float tensor [3, size, size].

    Args:
        size: output side in pixels.
        train: random crop + flip (True) or a plain resize (False).
        scale: RandomResizedCrop's area range (train only).
        ratio: RandomResizedCrop's aspect range (train only).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
    """

    def __init__(
        self,
        size: int = 224,
        train: bool = True,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        self.size, self.train, self.scale, self.ratio = size, train, scale, ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one image.

        Args:
            image: an RGB PIL image.
            generator: random source for the train crop and flip (the global one when None); unused in eval.

        Returns:
            float32 tensor [3, size, size].
        """
        if self.train:
            box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, generator)
            # Crop first, as torchvision does: resize(box=...) would also sample pixels just outside the box.
            image = image.crop(box).resize((self.size, self.size), Image.Resampling.BICUBIC)
            if torch.rand((), generator=generator).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std
