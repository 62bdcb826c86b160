"""Preprocessing matches the reference pipeline and survives the images people actually upload."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from model.nn.config import PreprocessConfig
from model.images.preprocess import preprocess, to_rgb, train_transform

CFG = PreprocessConfig()


def _photo(size=(300, 200), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def test_inference_transform_equals_torchvision_reference():
    image = _photo()
    reference = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CFG.mean, CFG.std),
    ])(image)
    ours = preprocess(image, CFG)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_rgba_transparency_lies_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(image).getpixel((5, 5)) == (255, 255, 255)
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    assert to_rgb(image).getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    elif mode in ("I", "F"):
        image = Image.fromarray(np.full((8, 8), 200, dtype=np.int32 if mode == "I" else np.float32))
    else:
        image = _photo((8, 8)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode == "I;16":
        assert rgb.getpixel((0, 0)) == (155, 155, 155)  # 40000 / 65535 * 255, not clipped to white
    assert preprocess(image, PreprocessConfig(image_size=56)).shape == (3, 56, 56)


def test_cmyk_jpeg_round_trip():
    buffer = io.BytesIO()
    _photo().convert("CMYK").save(buffer, "JPEG")
    assert preprocess(Image.open(io.BytesIO(buffer.getvalue())), CFG).shape == (3, 224, 224)


def test_train_transform_is_random_but_seedable():
    image = _photo((400, 300))
    transform = train_transform(CFG)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 224, 224)
    assert torch.equal(a, b) and not torch.equal(a, c)
