"""Weight-only int8w / int4 for CPU workstations: quantised bundles written once and loaded small,
random presets built one layer at a time, auto's choice, and clear errors where kernels are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, start_server
from model.errors import spell
from model.weights.bundle import BundleError, load_bundle, quantize_bundle, verify_bundle
from model.weights.policy import LoadPolicy, PolicyError, Sizing, choose_policy
from model.nn.skingpt import IMAGE_TOKEN_ID
from model.weights.weight_only import WeightOnlyLinear, dequantize, kernel_speeds, quantize_tensor

CPU = LoadPolicy(device="cpu", quantize="auto")


@pytest.fixture(scope="module")
def int4_bundle(tiny_bundle, tmp_path_factory):
    return quantize_bundle(tiny_bundle, tmp_path_factory.mktemp("quantised") / "int4", "int4")


def _logits(loaded) -> torch.Tensor:
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 40] + [IMAGE_TOKEN_ID] * 32 + [41, 42, 43]])
    with torch.no_grad():
        return loaded.model(ids, pixels=pixels).logits.float()


def _photo(path):
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("mode", ["int8w", "int4"])
def test_a_quantised_bundle_round_trips_to_the_same_logits_as_quantising_in_memory(tiny_bundle, tmp_path, mode):
    out = quantize_bundle(tiny_bundle, tmp_path / mode, mode)
    manifest = verify_bundle(out)  # every file's sha256, the quantised shards and the record included
    source = load_bundle(tiny_bundle)
    assert "llm/quantization.json" in manifest["files"]
    assert any(name.startswith("llm/quantized-") for name in manifest["files"])
    assert not any(name.endswith("model.safetensors") for name in manifest["files"])  # no float LLM weights left
    assert manifest["sources"]["quantized_from"] == {"bundle": str(tiny_bundle.resolve()),
                                                     "bundle_hash": source.bundle_hash, "mode": mode}

    stored = load_bundle(out)
    in_memory = load_bundle(tiny_bundle, LoadPolicy(device="cpu", quantize=mode))
    assert stored.policy.quantize == mode and f"quantised to {mode}" in stored.note
    assert isinstance(stored.model.llm.model.layers[0].mlp.down_proj, WeightOnlyLinear)
    assert torch.equal(_logits(stored), _logits(in_memory))
    assert stored.footprint["llm"] == in_memory.footprint["llm"] < source.footprint["llm"] / 2

    shard = next((out / "llm").glob("quantized-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fails its sha256 check"):
        load_bundle(out)


def test_the_portable_int4_form_is_the_documented_one_and_the_kernel_agrees_with_it():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    portable = quantize_tensor(weight, "int4")
    assert portable["qweight"].shape == (16, 128) and portable["scales"].shape == (16, 2)  # groups of 128
    low, high = weight[0, :128].min(), weight[0, :128].max()
    step = (high - low) / 15
    first_two = torch.round((weight[0, :2] - low) / step).int().tolist()
    byte = int(portable["qweight"][0, 0])
    assert [byte & 0x0F, byte >> 4] == first_two  # the even column in the low nibble

    approx = dequantize(portable, "int4")
    assert ((approx - weight).norm() / weight.norm()) < 0.12  # 4-bit round-to-nearest
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    out = WeightOnlyLinear(portable, "int4")(x).float()
    expected = x.float() @ approx.T
    assert torch.allclose(out, expected, rtol=0.02, atol=0.05)

    int8 = quantize_tensor(weight, "int8w")
    assert ((dequantize(int8, "int8w") - weight).norm() / weight.norm()) < 0.01
    out8 = WeightOnlyLinear(int8, "int8w")(x).float()
    assert torch.allclose(out8, x.float() @ dequantize(int8, "int8w").T, rtol=0.02, atol=0.05)


def test_a_random_preset_is_built_layer_by_layer_and_its_saved_bundle_loads_the_same(tmp_path):
    from tools.bench import random_bundle
    from model.nn.config import preset

    config = preset("tiny")
    config = replace(config, generation=replace(config.generation, do_sample=False))
    built = random_bundle(config, LoadPolicy(device="cpu", quantize="int4"), save=tmp_path / "random-int4")
    assert isinstance(built.model.llm.model.layers[-1].self_attn.o_proj, WeightOnlyLinear)
    assert {p.dtype for p in built.model.vision.parameters()} == {torch.bfloat16}  # stored in bf16
    again = load_bundle(tmp_path / "random-int4")
    assert again.policy.quantize == "int4"
    assert torch.equal(_logits(built), _logits(again))


def test_a_quantised_bundle_answers_through_the_engine_and_the_cli(int4_bundle, tmp_path):
    from model.prompt.conversation import Conversation, ImageInput
    from model.serving.engine import Engine

    engine = Engine(load_bundle(int4_bundle))
    image = ImageInput.of(Image.open(_photo(tmp_path / "arm.png")))
    generation = engine.stream(Conversation().ask("What is it?", [image]), max_new_tokens=8, do_sample=False,
                               fixed_length=True)
    "".join(generation)
    assert generation.finish_reason == "length" and len(generation.tokens) == 8

    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--weights", str(int4_bundle), "--image",
                           str(tmp_path / "arm.png"), "--greedy", "--max-new-tokens", "6", "--lang", "en"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "the bundle's LLM is quantised to int4" in done.stderr  # the start-up line says what runs
    assert done.stdout.strip()


def test_a_quantised_bundle_answers_in_the_app(int4_bundle, tmp_path_factory):
    from gradio_client import Client, handle_file

    work = tmp_path_factory.mktemp("int4-server")
    photo = _photo(work / "arm.png")
    servers = start_server(work, SKINGPT_WEIGHTS=str(int4_bundle), XDG_CACHE_HOME=str(work / "cache"))
    server = next(servers)
    try:
        client = Client(server.url, verbose=False, download_files=False)
        history = client.predict({"text": "What is this?", "files": [handle_file(str(photo))]}, 16, False, 1.0, 0.9,
                                 api_name="/ask")[0]
        assert history[-1]["role"] == "assistant" and history[-1]["content"][0]["text"]
        assert "quantised to int4" in server.output()
    finally:
        next(servers, None)


def test_a_quantised_bundle_loads_only_as_it_was_quantised(int4_bundle, tmp_path):
    assert load_bundle(int4_bundle, LoadPolicy(device="cpu", quantize="none")).policy.quantize == "int4"
    with pytest.raises(BundleError, match="quantised to int4, which loads only as it is.*float bundle"):
        load_bundle(int4_bundle, LoadPolicy(device="cpu", quantize="int8w"))
    with pytest.raises(BundleError, match="already quantised"):
        quantize_bundle(int4_bundle, tmp_path / "twice", "int8w")


def test_a_quantised_bundle_says_so_where_its_kernels_are_missing(int4_bundle, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: refused before CUDA is touched
        with pytest.raises(PolicyError, match=r"this device \(cuda\).*with the float bundle"):
            load_bundle(int4_bundle, LoadPolicy(device="cuda"))
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    with pytest.raises(PolicyError, match=r"torch build \(.*\) lacks"):
        load_bundle(int4_bundle)


def test_a_damaged_quantised_shard_names_the_layer(int4_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(int4_bundle, tmp_path / "broken")
    shard = next((broken / "llm").glob("quantized-*.safetensors"))
    tensors = load_file(shard)
    key = "model.layers.0.mlp.up_proj.scales"
    tensors[key] = tensors[key].float()
    save_file(tensors, shard)
    with pytest.raises(BundleError, match=r"model\.layers\.0\.mlp\.up_proj: quantised scales is torch\.float32"):
        load_bundle(broken, verify=False)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(BundleError, match=r"lack.*model\.layers\.0\.mlp\.up_proj\.scales"):
        load_bundle(broken, verify=False)


SEVEN_B = Sizing(llm_params=6_738_000_000, linear_params=6_476_000_000, encoder_params=1_090_000_000)


@pytest.mark.parametrize("speeds, free_gib, chosen, flag", [
    ({"bf16": 5.7, "int8w": 3.4, "int4": 3.6}, 24, "int8w", "--quantize int8w"),  # a tie: closer to float wins
    ({"bf16": 2.97, "int8w": 1.22, "int4": 0.64}, 24, "int4", "--quantize int4"),
    ({"bf16": 1.0, "int8w": 2.0, "int4": 3.0}, 24, "none", "--dtype bf16"),
    ({"bf16": 1.0, "int8w": 2.0, "int4": 3.0}, 10, "int8w", "--quantize int8w"),  # bf16 (16.6 GiB) does not fit
    ({"bf16": 1.0, "int8w": 2.0, "int4": 3.0}, 8, "int4", "--quantize int4"),
])
def test_auto_picks_the_fastest_mode_that_fits(speeds, free_gib, chosen, flag):
    policy, why = choose_policy(CPU, SEVEN_B, free_gib << 30, lambda: speeds)
    assert (policy.device, policy.dtype, policy.quantize) == ("cpu", "bf16", chosen)
    assert why.startswith(f"auto on this CPU: {flag}, the fastest that fits") and f"of {free_gib:.1f} GiB free" in why


def test_auto_says_when_nothing_fits_and_leaves_small_models_gpus_and_explicit_dtypes_alone(monkeypatch):
    policy, why = choose_policy(CPU, SEVEN_B, 3 << 30, lambda: {"bf16": 1.0, "int8w": 1.0, "int4": 1.0})
    assert policy.quantize == "int4" and "may not fit: close other programs" in why

    def never():
        raise AssertionError("no timing needed")

    small = Sizing(llm_params=374_000_000, linear_params=300_000_000, encoder_params=1_000_000)
    policy, why = choose_policy(CPU, small, 64 << 30, never)
    assert policy.quantize == "none" and policy.resolve_dtype() == torch.float32 and "small" in why
    policy, why = choose_policy(LoadPolicy(device="cpu", dtype="fp32", quantize="auto"), SEVEN_B, 64 << 30, never)
    assert (policy.dtype, policy.quantize) == ("fp32", "none") and "fp32 asked for (the dtype setting)" in spell(why)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    policy, why = choose_policy(LoadPolicy(quantize="auto"), SEVEN_B, 64 << 30, never)
    assert policy.quantize == "none" and why.startswith("auto on a GPU: the LLM in bf16")


def test_auto_times_this_cpu_for_real():
    speeds = kernel_speeds(width=512, reps=3)
    assert set(speeds) == {"bf16", "int8w", "int4"} and all(ms > 0 for ms in speeds.values())
    policy, why = choose_policy(CPU, SEVEN_B, 64 << 30, lambda: speeds)
    assert policy.quantize in ("none", "int8w", "int4") and "one 4096x4096 product" in why
    assert all(f"{mode} {ms:.2f} ms" in why for mode, ms in speeds.items())


def test_a_half_precision_encoder_can_compute_in_fp32_and_keeps_its_memory(tiny_bundle, monkeypatch):
    from model.weights import policy as quantization
    from model.weights.policy import compute_in_fp32

    def weight_bytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    stored = load_bundle(tiny_bundle, LoadPolicy(device="cpu", dtype="bf16", quantize="none", encoder_compute="stored"))
    assert stored.note == "" and stored.model.vision.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    half = stored.model.encode_image(pixels).float()
    before = weight_bytes(stored.model.vision)
    # the same bf16 weights, multiplied in fp32
    reference = load_bundle(tiny_bundle, LoadPolicy(device="cpu", dtype="bf16", encoder_compute="stored"))
    reference.model.vision.float()
    compute_in_fp32(stored.model.vision)
    assert stored.model.vision.blocks[0].attn.qkv.weight.dtype == torch.float32  # what the layer computes with
    assert weight_bytes(stored.model.vision) == before  # what it keeps
    fp32 = stored.model.encode_image(pixels).float()
    assert torch.allclose(fp32, reference.model.encode_image(pixels).float(), atol=1e-2)
    assert torch.allclose(fp32, half, atol=0.1)  # bf16 arithmetic only rounds differently

    monkeypatch.setattr(quantization, "half_is_slower_than_fp32", lambda dtype: (True, 5.6))
    fast = load_bundle(tiny_bundle, LoadPolicy(device="cpu", dtype="bf16"))
    assert "computes in fp32 (bf16 products are 5.6x slower on this CPU)" in fast.note
    assert fast.model.vision.blocks[0].attn.qkv.weight.dtype == torch.float32
    monkeypatch.setattr(quantization, "half_is_slower_than_fp32", lambda dtype: (False, 0.5))
    assert load_bundle(tiny_bundle, LoadPolicy(device="cpu", dtype="bf16", quantize="none")).note == ""
