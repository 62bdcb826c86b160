"""Decode an uploaded photo safely: every failure is a clear message, never a crash.

Only an allow-list of raster formats is ever decoded (never EPS / PS / PDF, whose Pillow plug-ins
call external programs). The result is a fresh 8-bit sRGB image built from the pixels alone: its
colour profile applied (skin tone depends on it), turned upright by its EXIF orientation, then
stripped of all metadata (EXIF, GPS, ICC, text chunks), in memory.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from model.errors import UserFacingError
from model.images.preprocess import to_rgb

MAX_BYTES = 25 * 2**20  # a phone photo is 2-10 MB
MAX_PIXELS = 40_000_000  # 40 megapixels; decompression bombs claim far more
MIN_SIDE = 16
# What Pillow may decode. (Many phones' JPEGs open as MPO, a JPEG with a preview frame: the JPEG opener.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, TIFF or BMP"
Image.init()  # registers every plug-in, so that each name above is known to Image.open
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class ImageError(UserFacingError, ValueError):
    """An upload that is not a usable photo."""


class ImageTooLarge(ImageError):
    """A photo over the byte or pixel limit (an API answers it with 413)."""


@dataclass(frozen=True)
class Photo:
    image: Image.Image  # clean, upright, 8-bit sRGB, no metadata
    notes: tuple[str, ...] = field(default=())  # what the user should know (first frame only, ...)


def _too_large(name: str, pixels: int) -> ImageError:
    return ImageTooLarge(f"{name} is too large: {pixels / 10**6:,.0f} megapixels, and the limit is "
                      f"{MAX_PIXELS // 10**6} megapixels. Please send a smaller photo (most phones can share a "
                      f"reduced size).")


@contextlib.contextmanager
def _opening(name: str) -> Iterator[None]:
    """Pillow's many failures while opening or decoding, as one clear ImageError each."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # Pillow's own, larger limit
        claimed = re.search(r"size \((\d+) pixels\)", str(err))
        raise _too_large(name, int(claimed.group(1)) if claimed else 2 * MAX_PIXELS) from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name} is not a photo this app can read; please send a {FORMAT_NAMES} image.") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        raise ImageError(f"{name} could not be read: it seems damaged or incomplete. Please send it again.") from err


def _check_pixels(name: str, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large(name, width * height)


def decode_photo(data: bytes, name: str = "the file") -> Photo:
    """Bytes of an uploaded file -> a clean, upright sRGB image with no metadata, and notes."""
    if not data:
        raise ImageError(f"{name} is empty; please choose a photo ({FORMAT_NAMES}).")
    if len(data) > MAX_BYTES:
        raise ImageTooLarge(f"{name} is {len(data) / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB. "
                         f"Please send a smaller photo (most phones can share a reduced size).")
    notes: list[str] = []
    with _opening(name):
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_pixels(name, image)
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != "MPO":  # an MPO's second frame is the phone's preview
            notes.append(f"{name} has {frames} frames (an animation or a multi-page file); only the first "
                         f"one is used.")
        image.seek(0)
        image.load()
    if min(image.size) < MIN_SIDE:
        raise ImageError(f"{name} is only {image.size[0]}x{image.size[1]} pixels; please send a real photo.")
    upright = to_rgb(_to_srgb(ImageOps.exif_transpose(image), image.info.get("icc_profile")))
    clean = Image.new("RGB", upright.size)  # a new image from the pixels alone: no metadata survives
    clean.frombytes(upright.tobytes())
    return Photo(clean, tuple(notes))


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Apply an embedded colour profile (a phone's Display P3, a camera's Adobe RGB, a CMYK scan)
    so that the pixels mean sRGB once the profile is stripped. A broken profile is ignored."""
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGBA" if image.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image


def read_image_file(path: str | Path) -> Image.Image:
    """A photo on disk, decoded exactly as an upload is: every reader of a photo (serving, training,
    differential fitting, evaluation) comes through here, so the model learns what it is shown."""
    return read_photo_file(path).image


def check_photo_file(path: str | Path) -> None:
    """What `read_photo_file` would refuse before decoding: a missing or oversized file, a format
    outside the allow-list, a damaged header, too many pixels. Cheap: the pixels are not decoded."""
    path = _stored(path)
    with _opening(str(path)), Image.open(path, formats=FORMATS) as image:
        _check_pixels(str(path), image)
        image.verify()


def read_photo_file(path: str | Path) -> Photo:
    path = _stored(path)
    return decode_photo(path.read_bytes(), name=str(path))


def _stored(path: str | Path) -> Path:
    """A photo file that exists and is within the byte limit."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path} does not exist.")
    if path.stat().st_size > MAX_BYTES:
        raise ImageError(f"{path} is larger than {MAX_BYTES // 2**20} MB; please use a smaller photo.")
    return path
