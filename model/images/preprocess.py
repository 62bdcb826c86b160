"""Image preprocessing as a pure function of its config (the reference's, exactly)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from model.nn.config import PreprocessConfig

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB. Transparency is laid on white (the reference crashed on RGBA)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # 16-bit data, or small ints
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _normalise(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    pixels = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Inference transform: RGB, resize to a square (no crop, aspect not kept), normalise -> (3, S, S)."""
    size = (cfg.image_size, cfg.image_size)
    return _normalise(to_rgb(image).resize(size, _RESAMPLE[cfg.interpolation]), cfg)


def train_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform: random resized crop (area scale train_min_scale..1, aspect 3/4..4/3),
    drawn from torch's global RNG so that a seeded run repeats itself."""
    from torchvision.transforms import RandomResizedCrop  # only training needs torchvision's sampler

    def transform(image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        top, left, height, width = RandomResizedCrop.get_params(
            image, scale=(cfg.train_min_scale, 1.0), ratio=(3 / 4, 4 / 3))
        cropped = image.crop((left, top, left + width, top + height))
        return _normalise(cropped.resize((cfg.image_size, cfg.image_size), _RESAMPLE[cfg.interpolation]), cfg)

    return transform
