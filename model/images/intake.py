"""Taking a photo in: the one path every front-end calls (the page's upload route and chat, the API,
`ask`, `chat`'s /image, a kept visit's earlier photo).

Bytes or a file in; out, the clean image (`decode`: allow-listed formats, colour profile applied,
upright, no metadata), how good it is to judge (`quality`), and what the user should be told about
it. A front-end keeps only what is its own: the memory it allows, where it keeps a private copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from PIL import Image

from model.images.decode import ImageError, decode_photo, read_photo_file
from model.images.quality import PhotoQuality, assess

GONE = "That file is no longer on the server; please attach the photo again"


@dataclass(frozen=True)
class Intake:
    """One photo as taken in: the clean image, its quality (measured on arrival, so it can be said
    before the question is asked) and its notes (only the first frame used, ...)."""

    image: Image.Image  # clean, upright, 8-bit sRGB, no metadata
    quality: PhotoQuality
    notes: tuple[str, ...] = ()

    @property
    def pixel_bytes(self) -> int:
        """What the decoded image holds in memory (RGB, one byte a channel)."""
        return self.image.width * self.image.height * 3

    def tell(self, lang: str = "en") -> list[str]:
        """Everything the user should hear about this photo, in order: its notes, then what is wrong
        with it for judging (nothing when it is fine)."""
        return [*self.notes, *filter(None, [self.quality.notice(lang)])]


def take_photo(source: bytes | str | Path, name: str = "That file") -> Intake:
    """An uploaded file's bytes, or a photo file on disk, taken in (ImageError: why it is not a
    usable photo, said to the user as it stands)."""
    photo = decode_photo(source, name=name) if isinstance(source, (bytes, bytearray)) else read_photo_file(source)
    return Intake(photo.image, assess(photo.image), photo.notes)


@dataclass(frozen=True)
class Kept:
    """A taken photo whose pixels live on disk only (`keep_lossless`), not in memory: where, and what
    was measured when it was taken in."""

    path: Path
    quality: PhotoQuality
    notes: tuple[str, ...]


def keep_lossless(intake: Intake, path: Path) -> Kept:
    """Write a taken photo's pixels as a new lossless PNG file only this user can read (a front-end's
    private copy, which the browser shows and `reopen` reads back)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        intake.image.save(handle, "PNG", compress_level=1)  # fast, lossless: the model sees these pixels
    return Kept(path, intake.quality, intake.notes)


def reopen(kept: Kept) -> Intake:
    """A photo that `keep_lossless` wrote, read back with what was measured when it was taken in
    (ImageError when the file is gone or not that PNG)."""
    try:
        with Image.open(kept.path, formats=("PNG",)) as image:
            image.load()
            pixels = image.convert("RGB")
    except OSError:
        raise ImageError(GONE) from None
    return Intake(pixels, kept.quality, kept.notes)
