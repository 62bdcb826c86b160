"""The opt-in int8 image encoder (`quantize --encoder int8`): what it stores, that it loads strictly
through the real loader into the torch and llama.cpp runtimes, how far it moves the query embeddings
of the tiny model, and the mistakes `quantize` refuses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import ROOT
from model.prompt.conversation import Conversation, ImageInput
from model.images.preprocess import preprocess
from model.serving.engine import Engine
from model.weights.bundle import ENCODER_FILE, LLM_DIR, BundleError, load_bundle, quantize_bundle, read_manifest
from model.weights.encoder_int8 import Int8Linear, is_quantised_name, quantise_tensor
from model.weights.gguf_llm import GGUF_FILE
from model.weights.summary import describe_bundle, format_text


def _photo(seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return ImageInput.of(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    return quantize_bundle(tiny_bundle, tmp_path_factory.mktemp("int8enc") / "b", None, "int8")


def test_rows_are_quantised_symmetrically_within_half_a_step():
    weight = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantise_tensor(weight)
    assert q.dtype == torch.int8 and scale.shape == (48,) and int(q.abs().max()) == 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6).all())


def test_the_file_holds_the_vit_linears_as_int8_and_the_rest_as_it_was(tiny_bundle, int8_bundle):
    with safe_open(str(int8_bundle / ENCODER_FILE), "pt") as new, \
            safe_open(str(tiny_bundle / ENCODER_FILE), "pt") as old:
        quantised = [k for k in old.keys() if is_quantised_name(k)]
        assert quantised and all(k.startswith("vision.blocks.") for k in quantised)
        for key in quantised:
            stem = key[: -len(".weight")]
            assert new.get_tensor(stem + ".qweight").dtype == torch.int8
            assert new.get_tensor(stem + ".scale").dtype == torch.float32
            assert key not in new.keys()
        kept = [k for k in old.keys() if not is_quantised_name(k)]
        assert any(k.startswith("qformer.") for k in kept) and all(k in new.keys() for k in kept)
    sources = read_manifest(int8_bundle)["sources"]
    assert sources["quantized_from"]["encoder"] == "int8"
    info = describe_bundle(int8_bundle)
    assert info["bundle"]["encoder"] == "int8" and "ViT linears are stored in int8" in format_text(info)
    assert "mode" not in sources["quantized_from"]  # the LLM was not touched: still the float one


def test_it_loads_strictly_and_encodes_close_to_the_float_encoder(tiny_bundle, int8_bundle):
    float_model, int8 = load_bundle(tiny_bundle), load_bundle(int8_bundle)
    linears = [m for m in int8.model.vision.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * len(int8.model.vision.blocks)
    assert "int8" in int8.note and "eval" in int8.note
    assert int8.footprint["vision"] < 0.7 * float_model.footprint["vision"]
    worst = 0.0
    for seed in range(3):
        pixels = preprocess(_photo(seed).image, int8.config.preprocess).unsqueeze(0)
        a, b = float_model.model.encode_image(pixels).float(), int8.model.encode_image(pixels).float()
        worst = max(worst, float((a - b).norm() / a.norm()))
    assert 0 < worst < 0.01, worst  # measured 0.04% on the tiny model's random weights


def test_a_gguf_bundle_gets_an_int8_encoder_and_answers_through_llama_cpp(tiny_bundle, tmp_path):
    gguf = quantize_bundle(tiny_bundle, tmp_path / "q8", "q8_0")
    out = quantize_bundle(gguf, tmp_path / "q8-int8", None, "int8")
    assert os.stat(out / LLM_DIR / GGUF_FILE).st_ino == os.stat(gguf / LLM_DIR / GGUF_FILE).st_ino  # linked, not copied
    sources = read_manifest(out)["sources"]["quantized_from"]
    assert sources["mode"] == "q8_0" and sources["encoder"] == "int8" and "encoder_from" in sources
    loaded = load_bundle(out)
    assert loaded.runtime == "llama.cpp" and "int8" in loaded.note
    generation = Engine(loaded).stream(Conversation().ask("What is this?", [_photo(0)]), do_sample=False,
                                       max_new_tokens=8, fixed_length=True)
    "".join(generation)
    assert len(generation.tokens) == 8


def test_quantize_refuses_what_it_cannot_do(tiny_bundle, int8_bundle, tmp_path):
    with pytest.raises(BundleError, match="int8 already"):
        quantize_bundle(int8_bundle, tmp_path / "again", None, "int8")
    with pytest.raises(BundleError, match="say what to quantise"):
        quantize_bundle(tiny_bundle, tmp_path / "nothing", None, "bf16")
    result = subprocess.run([sys.executable, "launch.py", "quantize", "--weights", str(tiny_bundle), "--out",
                             str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--encoder int8" in result.stderr and not (tmp_path / "cli").exists()
