"""Image files decoded into one image of the contract's input: uint8 RGB, resized to its size."""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnpipe.contract import HEIGHT, WIDTH

# Decoding is refused above this many pixels: a small file can claim a huge image.
MAX_PIXELS = 25_000_000


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) gray scaled to 8 bits, float from 0-1: Pillow's convert()
    clips them at 255 instead, so a 16-bit gray picture would come out nearly white."""
    pixels = np.asarray(image)
    scaled = np.clip(pixels, 0, 1) * 255 if image.mode == "F" else np.clip(pixels, 0, 65535) / 257
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def decode(data: bytes) -> tuple[np.ndarray, str | None]:
    """Image bytes -> (HEIGHT, WIDTH, 3) uint8 RGB, and a note when the image had to be resized.

    Raises ValueError with a short reason for anything Pillow cannot read as an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                image = to_8bit(image)
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error.__class__.__name__})") from None
    note = None
    if rgb.size != (WIDTH, HEIGHT):
        note = f"resized from {rgb.width}x{rgb.height}"
        rgb = rgb.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), note
