"""Strict bundle loading: hashes, missing files, and every key mismatch named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.weights.bundle import BundleError, load_bundle, verify_bundle, write_manifest


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _rewrite_encoder(bundle, edit):
    tensors = load_file(str(bundle / "encoder.safetensors"))
    edit(tensors)
    save_file(tensors, str(bundle / "encoder.safetensors"))
    write_manifest(bundle)  # hashes match again, so only the strict key check can object


def test_manifest_lists_every_file_with_sha256(tiny_bundle):
    manifest = verify_bundle(tiny_bundle)
    files = set(manifest["files"])
    assert {"skingpt.yaml", "encoder.safetensors", "llm/config.json", "llm/model.safetensors",
            "llm/tokenizer.json"} <= files
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in manifest["files"].values())


def test_corrupted_file_fails_sha256(bundle):
    path = bundle / "llm" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"llm/model.safetensors fails its sha256 check"):
        load_bundle(bundle)


def test_missing_file_is_named(bundle):
    (bundle / "encoder.safetensors").unlink()
    with pytest.raises(BundleError, match=r"lacks encoder.safetensors, which its manifest lists"):
        load_bundle(bundle)


def test_no_bundle_says_how_to_get_one(tmp_path):
    with pytest.raises(BundleError, match=r"no SkinGPT bundle at .*SkinGPT.s `convert` command"):
        load_bundle(tmp_path / "nowhere")


def test_missing_key(bundle):
    _rewrite_encoder(bundle, lambda t: t.pop("proj.bias"))
    with pytest.raises(BundleError, match=r"missing key proj.bias \(expected shape \(64,\)\)"):
        load_bundle(bundle)


def test_unexpected_key(bundle):
    _rewrite_encoder(bundle, lambda t: t.update({"proj.extra": torch.zeros(3)}))
    with pytest.raises(BundleError, match=r"unexpected key proj.extra \(shape \(3,\)\)"):
        load_bundle(bundle)


def test_wrong_shape_names_both_shapes(bundle):
    _rewrite_encoder(bundle, lambda t: t.update({"query_tokens": torch.zeros(1, 8, 32)}))
    with pytest.raises(BundleError, match=r"key query_tokens: file has shape \(1, 8, 32\), model expects \(1, 32, 32\)"):
        load_bundle(bundle)


def test_llm_missing_weight_is_an_error(bundle):
    path = bundle / "llm" / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(path), metadata={"format": "pt"})
    write_manifest(bundle)
    with pytest.raises(BundleError, match=r"missing keys: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_bundle(bundle)


def test_llm_config_must_match_bundle_config(bundle):
    path = bundle / "llm" / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = 3
    path.write_text(json.dumps(config))
    write_manifest(bundle)
    with pytest.raises(BundleError, match="does not match the llm section"):
        load_bundle(bundle)


def test_serving_refuses_pickled_llm(bundle):
    (bundle / "llm" / "model.safetensors").unlink()
    torch.save({}, bundle / "llm" / "pytorch_model.bin")
    write_manifest(bundle)
    with pytest.raises(BundleError, match="serving never unpickles"):
        load_bundle(bundle)


def test_loaded_bundle_is_frozen_and_reports_footprint(tiny_bundle):
    loaded = load_bundle(tiny_bundle)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    assert set(loaded.footprint) == {"vision", "ln_vision", "qformer", "query_tokens", "proj", "llm"}
    assert loaded.footprint["proj"] == (32 * 64 + 64) * 4  # fp32 on CPU
    assert len(loaded.bundle_hash) == 64


def test_start_up_verifies_once_then_only_what_changed(bundle, tmp_path, monkeypatch):
    """A 13B bundle is 28 GB to hash: a second start reads no file that is unchanged since it passed."""
    import os

    from model.weights import bundle as checkpoint
    from model.weights.bundle import verification_record

    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path, bar=None: hashed.append(path.name) or real(path, bar))
    record = verification_record(tmp_path / "cache", bundle)
    files = len(verify_bundle(bundle)["files"])

    hashed.clear()
    load_bundle(bundle, record=record)
    assert len(hashed) == files and record.is_file()  # the first start hashes everything
    hashed.clear()
    load_bundle(bundle, record=record)
    assert hashed == []  # the second, nothing

    config = bundle / "llm" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    hashed.clear()
    load_bundle(bundle, record=record)
    assert hashed == ["config.json"]  # a touched file is hashed again

    weights = bundle / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: ctime still moves
    with pytest.raises(BundleError, match="model.safetensors fails its sha256 check"):
        load_bundle(bundle, record=record)
    hashed.clear()
    with pytest.raises(BundleError, match="fails its sha256 check"):
        verify_bundle(bundle)  # without a record (inspect --verify): everything, and still caught
    assert len(hashed) >= 1


def test_a_truncated_file_is_named_before_any_hashing(bundle):
    weights = bundle / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"encoder.safetensors is 100 bytes but its manifest says"):
        verify_bundle(bundle)


def test_inspect_verify_hashes_everything_and_plain_inspect_uses_the_record(bundle, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "SKINGPT_CACHE_DIR": str(tmp_path / "cache")}
    for flags in ([], [], ["--verify"]):
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "inspect", "--weights", str(bundle), *flags],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0 and "sha256 verified" in proc.stdout, proc.stderr
    assert list((tmp_path / "cache" / "verified").glob("*.json"))
    (bundle / "skingpt.yaml").write_text((bundle / "skingpt.yaml").read_text() + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "inspect", "--weights", str(bundle)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "skingpt.yaml is" in proc.stderr  # a changed file is checked again
