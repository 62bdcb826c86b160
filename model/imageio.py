"""Decode an uploaded photo safely: every failure is a clear message, never a crash.

The result is a fresh 8-bit RGB image built from the pixels alone: turned upright by its EXIF
orientation, then stripped of all metadata (EXIF, GPS, ICC, text chunks), in memory.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserFacingError
from .preprocess import to_rgb

MAX_BYTES = 25 * 2**20  # a phone photo is 2-10 MB
MAX_PIXELS = 40_000_000  # 40 megapixels; decompression bombs claim far more
MIN_SIDE = 16


class ImageError(UserFacingError, ValueError):
    """An upload that is not a usable photo."""


def open_image(data: bytes, name: str = "the file") -> Image.Image:
    """Bytes of an uploaded file -> a clean, upright RGB image with no metadata."""
    if not data:
        raise ImageError(f"{name} is empty; please choose a photo (JPEG, PNG or WebP)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name} is {len(data) / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB. "
                         f"Please send a smaller photo (most phones can share a reduced size)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{name} is {width}x{height} pixels; the limit is {MAX_PIXELS // 10**6} "
                                 f"megapixels. Please send a smaller photo")
            if getattr(image, "n_frames", 1) > 1:
                raise ImageError(f"{name} is animated or has several frames; please send a single still photo")
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name} is not a photo this app can read (use JPEG, PNG or WebP)") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise ImageError(f"{name} could not be read: it seems damaged or incomplete. Please send it again") from err
    if min(image.size) < MIN_SIDE:
        raise ImageError(f"{name} is only {image.size[0]}x{image.size[1]} pixels; please send a real photo")
    upright = to_rgb(ImageOps.exif_transpose(image))
    clean = Image.new("RGB", upright.size)  # a new image from the pixels alone: no metadata survives
    clean.frombytes(upright.tobytes())
    return clean


def read_image_file(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise ImageError(f"{path} is larger than {MAX_BYTES // 2**20} MB; please use a smaller photo")
    return open_image(path.read_bytes(), name=str(path))
