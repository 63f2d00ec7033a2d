"""Image bytes decoded into uint8 RGB at a model's size, in one place: the prepare stage, `cnnpipe
predict` and the service all decode through `decode`, so a picture is the same pixels in training
and in production. Numpy and Pillow only (the service imports it)."""

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoding is refused above this many pixels: a small file can claim a huge image.
MAX_PIXELS = 25_000_000


def too_large(size: str) -> str:
    return f"image of {size} pixels is too large (at most {MAX_PIXELS:,} pixels)"


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) gray scaled to 8 bits, float from 0-1: Pillow's convert()
    clips them at 255 instead, so a 16-bit gray picture would come out nearly white."""
    pixels = np.asarray(image)
    scaled = np.clip(pixels, 0, 1) * 255 if image.mode == "F" else np.clip(pixels, 0, 65535) / 257
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def decode(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """Image bytes -> (height, width, 3) uint8 RGB at `size` (height, width), upright as its EXIF
    orientation says, and a note when the image had to be resized. The first frame of an
    animation; gray, palette, RGBA, CMYK and 16-bit images become 8-bit RGB.

    Raises ValueError with a short reason, for people, for anything that is not a usable image.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns of a possible decompression bomb above its own limit, and raises above
            # twice that; MAX_PIXELS refuses both first, in one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ValueError(too_large(f"{image.width}x{image.height}"))
                image.load()
                # Cameras store pixels as the sensor saw them and the way up in EXIF.
                image = ImageOps.exif_transpose(image)
                if image.mode.startswith("I") or image.mode == "F":
                    image = to_8bit(image)
                rgb = image.convert("RGB")
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ValueError(too_large(pixels[1] if pixels else "more")) from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image: not a format an image library knows") from None
    except OSError:
        raise ValueError("not a readable image: the file is truncated or corrupt") from None
    note = None
    height, width = size
    if rgb.size != (width, height):
        note = f"resized from {rgb.width}x{rgb.height}"
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), note
