"""Precision and quantisation policies applied at load time (bitsandbytes quantises on CPU too)."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_bundle
from model.quantization import LoadPolicy, PolicyError
from model.skingpt import IMAGE_TOKEN_ID


def _logits(loaded):
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 40] + [IMAGE_TOKEN_ID] * 32 + [41, 42]])
    with torch.no_grad():
        return loaded.model(ids, pixels=pixels).logits.float()


@pytest.mark.parametrize("mode, layer_type", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantised_llm_on_cpu(tiny_bundle, mode, layer_type):
    full = load_bundle(tiny_bundle)
    quant = load_bundle(tiny_bundle, LoadPolicy(device="cpu", quantize=mode))
    mlp = quant.model.llm.model.layers[0].mlp.up_proj
    assert type(mlp).__name__ == layer_type
    # the image path is never quantised
    assert isinstance(quant.model.proj, torch.nn.Linear) and type(quant.model.proj).__name__ == "Linear"
    assert quant.model.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32
    assert quant.footprint["llm"] < full.footprint["llm"]
    expected, got = _logits(full), _logits(quant)
    assert torch.isfinite(got).all()
    # quantisation error is small on these weights: the answers agree on the next token almost everywhere
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree > 0.8, f"{mode} changed the argmax at {1 - agree:.0%} of positions"


def test_half_precision_policy_keeps_ln_vision_fp32(tiny_bundle):
    loaded = load_bundle(tiny_bundle, LoadPolicy(device="cpu", dtype="bf16"))
    assert loaded.model.vision.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert loaded.model.qformer.layernorm.weight.dtype == torch.bfloat16
    assert loaded.model.ln_vision.weight.dtype == torch.float32
    assert loaded.model.llm.dtype == torch.bfloat16
    embeds = loaded.model.encode_image(torch.randn(1, 3, 56, 56))
    assert embeds.dtype == torch.bfloat16 and torch.isfinite(embeds.float()).all()


def test_bad_policies_say_what_to_do():
    with pytest.raises(PolicyError, match="quantize must be one of none, int8, nf4"):
        LoadPolicy(quantize="int4")
    with pytest.raises(PolicyError, match="dtype must be auto or one of"):
        LoadPolicy(dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(PolicyError, match="no CUDA GPU is visible; use --device cpu"):
            LoadPolicy(device="cuda").resolve_device()
    assert LoadPolicy().resolve_device() in ("cpu", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_gpu_modes(tiny_bundle, mode):
    loaded = load_bundle(tiny_bundle, LoadPolicy(device="cuda", quantize=mode))
    assert loaded.model.vision.blocks[0].attn.qkv.weight.dtype in (torch.float16, torch.bfloat16)
    assert torch.isfinite(_logits_on(loaded, "cuda")).all()


def _logits_on(loaded, device):
    pixels = torch.randn(1, 3, 56, 56, device=device)
    ids = torch.tensor([[1, 40] + [IMAGE_TOKEN_ID] * 32 + [41]], device=device)
    with torch.no_grad():
        return loaded.model(ids, pixels=pixels).logits.float()


def test_slow_modes_on_a_cpu_are_warned_about_with_the_measured_figures():
    from model.quantization import LoadPolicy, cpu_advice

    nf4 = cpu_advice(LoadPolicy(device="cpu", quantize="nf4"))
    assert nf4 and "3.2x slower than bf16" in nf4 and "--dtype bf16" in nf4
    assert "slower than bf16" in cpu_advice(LoadPolicy(device="cpu", quantize="int8"))
    assert "--dtype bf16 decodes 1.3x faster" in cpu_advice(LoadPolicy(device="cpu", dtype="fp32"))
    assert cpu_advice(LoadPolicy(device="cpu", dtype="bf16")) is None
