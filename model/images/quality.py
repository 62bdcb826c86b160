"""Is a photo good enough to judge? Four measures on every accepted photo, each with a plain reason
and a way to retake it (teledermatology's most common failures: blurred, dark, overexposed, too far
away or too small).

All measures run on the luminance of a copy scaled to `ANALYSIS_SIDE` pixels on its long side, so a
12-megapixel phone photo and a 1-megapixel one are judged alike (and quickly: ~20 ms). A poor photo
is never refused: the user is told what is wrong and may continue. Thresholds were chosen on made
photos (a sharp synthetic skin photo of each Fitzpatrick tone, Gaussian-blurred, under- and over-
exposed, shrunk: `tools.fixtures.skin_photo`) and tests pin them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel

from model.i18n.catalog import text

ANALYSIS_SIDE = 512  # long side of the copy that is measured
MIN_SHORT_SIDE = 224  # the encoder's input: a photo smaller than this is enlarged, which adds no detail
MIN_SHARPNESS = 18.0  # variance of the Laplacian of the 0-255 luminance (made photos: sharp 37-606, blurred <= 8.8)
MAX_GAIN = 8.0  # the most a dark photo's luminance is scaled by before its sharpness is measured
DARK_MEAN = 40.0  # mean luminance below this: too dark (type VI skin in daylight measures ~49: never called dark)
DARK_CLIPPED = 0.5  # or more than half the frame crushed to near black (<= 10)
BRIGHT_MEAN = 225.0  # mean luminance above this: washed out
BRIGHT_CLIPPED = 0.2  # or a fifth of the frame clipped to white (>= 250): flash glare, direct sun
MIN_SKIN_FRACTION = 0.15  # less skin-coloured frame than this: the skin is small or not in view

PROBLEMS = ("blurry", "dark", "overexposed", "small", "little_skin")  # in the order they are told


class PhotoQuality(BaseModel):
    """What `assess` found: `ok` when there is no problem; the measures behind it, rounded."""

    ok: bool
    problems: list[str]  # names from PROBLEMS
    sharpness: float
    mean_luminance: float
    dark_fraction: float
    bright_fraction: float
    short_side: int
    skin_fraction: float

    def tips(self, lang: str = "en") -> list[str]:
        """One sentence per problem: what is wrong and how to retake the photo."""
        return [text(lang, f"quality.{name}") for name in self.problems]

    def notice(self, lang: str = "en") -> str:
        """What the user is told beside the answer ('' when the photo is fine); they may continue."""
        if self.ok:
            return ""
        return " ".join([text(lang, "quality.intro"), *self.tips(lang), text(lang, "quality.continue")])


def assess(image: Image.Image) -> PhotoQuality:
    """Measure one decoded RGB photo (see the module's note)."""
    rgb = _analysis_copy(image)  # (H, W, 3) float32, 0-255
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W), ITU-R BT.601
    mean = float(luma.mean())
    # The Laplacian's variance grows with contrast squared, so a dark photo reads as blurred however
    # sharp: judge a dark one as if it were exposed right (mean 128; the gain at most 8, past which
    # 8-bit steps are all there is to see).
    gain = min(MAX_GAIN, 128.0 / max(mean, 1.0)) if mean < DARK_MEAN else 1.0
    sharpness = float(_laplacian(luma * gain).var())
    dark, bright = float((luma <= 10).mean()), float((luma >= 250).mean())
    skin = float(_skin_mask(rgb).mean())
    problems = []
    if sharpness < MIN_SHARPNESS:
        problems.append("blurry")
    if mean < DARK_MEAN or dark > DARK_CLIPPED:
        problems.append("dark")
    if mean > BRIGHT_MEAN or bright > BRIGHT_CLIPPED:
        problems.append("overexposed")
    if min(image.size) < MIN_SHORT_SIDE:
        problems.append("small")
    if skin < MIN_SKIN_FRACTION and "dark" not in problems and "overexposed" not in problems:
        problems.append("little_skin")  # (exposure hides colour: that problem is told instead)
    return PhotoQuality(ok=not problems, problems=problems, sharpness=round(sharpness, 1), mean_luminance=round(mean, 1),
                        dark_fraction=round(dark, 3), bright_fraction=round(bright, 3), short_side=min(image.size),
                        skin_fraction=round(skin, 3))


def _analysis_copy(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    scale = ANALYSIS_SIDE / max(rgb.size)
    if scale < 1:  # never enlarged: a small photo is judged at its own size
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    return np.asarray(rgb, dtype=np.float32)


def _laplacian(luma: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian over the interior: (H-2, W-2)."""
    centre = luma[1:-1, 1:-1]
    return luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * centre


def _skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Skin-coloured pixels by chroma alone (Chai and Ngan's Cb/Cr box, JPEG's YCbCr), so that light
    and dark skin count alike; a test holds it true for all six Fitzpatrick tones."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return (cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173)
