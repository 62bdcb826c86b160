"""Uploads: every bad file gets a clear message; good ones come out upright, RGB and metadata-free."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.images.decode import ImageError, decode_photo


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
    clean = decode_photo(data).image
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
        decode_photo(data).image


def test_truncated_jpeg():
    data = _jpeg(_photo(256, 256))
    with pytest.raises(ImageError, match="damaged or incomplete"):
        decode_photo(data[: len(data) // 2]).image


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, claimed", [(100_000, 100_000, "10,000"), (10_000, 5_000, "50")])
def test_decompression_bomb_says_too_large_and_the_limit(width, height, claimed):
    """Beyond Pillow's own bomb limit (the first) and beyond ours (the second): the same clear message."""
    with pytest.raises(ImageError, match=f"too large: {claimed} megapixels, and the limit is 40 megapixels"):
        decode_photo(_png_header_only(width, height)).image


def test_postscript_and_other_formats_outside_the_allow_list_are_never_decoded(monkeypatch):
    """EPS would run Ghostscript: Pillow must not even try its plug-in."""
    from PIL import EpsImagePlugin

    def refuse(*args, **kwargs):
        raise AssertionError("the EPS plug-in was asked to decode")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"
    with pytest.raises(ImageError, match="not a photo this app can read.*JPEG, PNG, WebP, GIF, TIFF or BMP"):
        decode_photo(eps).image
    ico = io.BytesIO()
    _photo(32, 32).save(ico, "ICO")
    with pytest.raises(ImageError, match="not a photo this app can read"):
        decode_photo(ico.getvalue()).image


def test_too_many_bytes():
    with pytest.raises(ImageError, match="the limit is 25 MB"):
        decode_photo(b"\xff\xd8" + b"\0" * (26 * 2**20)).image


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_animated_gif_and_multipage_tiff_give_their_first_frame_with_a_note(fmt):
    frames = [Image.new("RGB", (32, 32), (80 * i, 255 - 80 * i, 40)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
    photo = decode_photo(buffer.getvalue(), name="scan")
    assert photo.image.getpixel((5, 5)) == (0, 255, 40)  # the first frame
    assert photo.notes == ("scan has 3 frames (an animation or a multi-page file); only the first one is used.",)


def test_a_phone_mpo_jpeg_is_one_photo_without_a_note():
    frames = [Image.new("RGB", (32, 32), (200, 100, 50)), Image.new("RGB", (32, 32), (0, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    photo = decode_photo(buffer.getvalue())
    assert photo.notes == () and abs(photo.image.getpixel((5, 5))[0] - 200) < 4


def _swapped_primaries_profile() -> bytes:
    """An RGB profile whose red and green primaries are swapped: sRGB's own, with the tag table's
    rXYZ and gXYZ entries exchanged. A pixel tagged with it that is 'red' in its numbers is green."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    data[r + 4:r + 12], data[g + 4:g + 12] = data[g + 4:g + 12], data[r + 4:r + 12]
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_colour_profile_is_applied_before_it_is_stripped(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 30, 30)).save(buffer, fmt, icc_profile=_swapped_primaries_profile(),
                                                   **({"quality": 95} if fmt == "JPEG" else {}))
    photo = decode_photo(buffer.getvalue())
    r, g, b = photo.image.getpixel((16, 16))
    assert g > 150 and r < 100, (r, g, b)  # the colour the profile means, now in sRGB numbers
    assert "icc_profile" not in photo.image.info
    plain = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 30, 30)).save(plain, "PNG")
    assert decode_photo(plain.getvalue()).image.getpixel((16, 16)) == (220, 30, 30)  # untagged: sRGB as it is


def test_a_broken_colour_profile_is_ignored():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 30, 30)).save(buffer, "PNG", icc_profile=b"not a profile" * 20)
    assert decode_photo(buffer.getvalue()).image.getpixel((16, 16)) == (220, 30, 30)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_unusual_modes_become_rgb(mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16))
    else:
        image = _photo(40, 40).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "TIFF" if mode == "CMYK" else "PNG")
    assert decode_photo(buffer.getvalue()).image.mode == "RGB"


def test_tiny_image_is_refused():
    buffer = io.BytesIO()
    _photo(4, 4).save(buffer, "PNG")
    with pytest.raises(ImageError, match="only 4x4 pixels"):
        decode_photo(buffer.getvalue()).image
