"""A converted full-size bundle (SKINGPT_REAL_WEIGHTS=DIR): every file's sha256, the published
architecture's shapes, and one greedy answer that reads as text. Opt-in: skipped without the variable.

    SKINGPT_REAL_WEIGHTS=weights/skingpt4-vicuna13b .venv/bin/python -m pytest -m real_weights
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def bundle() -> Path:
    return Path(os.environ["SKINGPT_REAL_WEIGHTS"])


@pytest.fixture(scope="module")
def loaded(bundle):
    from model.weights.bundle import load_bundle
    from model.weights.policy import LoadPolicy

    return load_bundle(bundle, LoadPolicy(), verify=False)  # the hashes have their own test


def test_every_file_passes_its_sha256(bundle):
    from model.weights.bundle import verify_bundle

    manifest = verify_bundle(bundle)  # no record: every byte is read
    assert {"skingpt.yaml", "encoder.safetensors", "llm/config.json"} <= set(manifest["files"])


def test_the_published_architecture(loaded):
    """EVA ViT-g/14 (39 blocks, width 1408), Q-Former with 32 queries of 768, projection into a 7B or 13B Llama."""
    model, cfg = loaded.model, loaded.config
    assert (cfg.vision.embed_dim, cfg.vision.depth, cfg.vision.img_size) == (1408, 39, 224)
    assert len(model.vision.blocks) == 39 and tuple(model.vision.pos_embed.shape) == (1, 257, 1408)
    assert tuple(model.query_tokens.shape) == (1, 32, 768)
    width = cfg.llm.hidden_size
    assert width in (4096, 5120) and tuple(model.proj.weight.shape) == (width, 768)
    assert tuple(model.llm.get_input_embeddings().weight.shape) == (cfg.llm.vocab_size, width)
    assert cfg.llm.vocab_size == 32000 and loaded.tokenizer.bos_token_id == 1 and loaded.tokenizer.eos_token_id == 2


def _skin_photo() -> Image.Image:
    """A skin-coloured field with a red, scaly-looking oval: enough for a described answer."""
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal((224, 172, 150), 8, (448, 448, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((120, 150, 330, 300), fill=(196, 70, 70), outline=(230, 220, 210), width=6)
    return image


def test_one_greedy_answer_reads_as_text(loaded):
    from model.prompt.conversation import Conversation, ImageInput
    from model.serving.engine import Engine

    engine = Engine(loaded)
    assert tuple(engine.encode(ImageInput.of(_skin_photo())).shape) == (32, loaded.config.llm.hidden_size)
    conversation = Conversation().ask("Describe the skin condition in this image.", [ImageInput.of(_skin_photo())])
    generation = engine.stream(conversation, do_sample=False, max_new_tokens=80)
    text = "".join(generation).strip()
    words = re.findall(r"[A-Za-z]+", text)
    assert generation.finish_reason in ("stop", "eos", "length") and "###" not in text
    assert len(words) >= 5, text  # a sentence, not silence or a token or two
    assert sum(map(len, words)) / max(1, len(text.replace(" ", ""))) > 0.7, text  # mostly words, not garbage
    assert max(words.count(w) for w in set(words)) <= max(3, len(words) // 3), text  # not one word repeated
    skin_words = {"skin", "red", "redness", "rash", "lesion", "patch", "plaque", "erythema", "erythematous", "scale",
                  "scaly", "spot", "area", "inflammation", "eczema", "psoriasis", "dermatitis", "image", "photo"}
    assert skin_words & {w.lower() for w in words}, text  # it talks about the photo
