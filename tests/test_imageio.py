"""Uploads: every bad file gets a clear message; good ones come out upright, RGB and metadata-free."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.imageio import ImageError, open_image


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def _photo(w=64, h=48):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_gps_exif_is_stripped_and_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    data = _jpeg(_photo(64, 48), exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825)  # the upload really carries GPS
    clean = open_image(data)
    assert clean.size == (48, 64)  # turned upright
    assert clean.mode == "RGB" and not clean.info and not clean.getexif()
    out = io.BytesIO()
    clean.save(out, "PNG")
    assert not Image.open(io.BytesIO(out.getvalue())).getexif()


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"%PDF-1.4 not a photo at all", "not a photo this app can read"),
    (b"GIF89a" + b"\0" * 10, "not a photo this app can read|damaged or incomplete"),
])
def test_not_an_image(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_truncated_jpeg():
    data = _jpeg(_photo(256, 256))
    with pytest.raises(ImageError, match="damaged or incomplete"):
        open_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="megapixels|not a photo"):
        open_image(_png_header_only(100_000, 100_000))


def test_too_many_bytes():
    with pytest.raises(ImageError, match="the limit is 25 MB"):
        open_image(b"\xff\xd8" + b"\0" * (26 * 2**20))


def test_animated_gif():
    frames = [Image.new("RGB", (32, 32), (80 * i, 255 - 80 * i, 40)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        open_image(buffer.getvalue())


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_unusual_modes_become_rgb(mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16))
    else:
        image = _photo(40, 40).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "TIFF" if mode == "CMYK" else "PNG")
    assert open_image(buffer.getvalue()).mode == "RGB"


def test_tiny_image_is_refused():
    buffer = io.BytesIO()
    _photo(4, 4).save(buffer, "PNG")
    with pytest.raises(ImageError, match="only 4x4 pixels"):
        open_image(buffer.getvalue())
