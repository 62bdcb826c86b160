"""The ranked differential: trained through the real CLI on a labelled synthetic image set (four
conditions that differ in colour and texture, 240 small images), calibrated, stored in a bundle with
its sha256, loaded automatically, shown by `ask --json`, the report and the app; bad head files get
clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from model.weights.bundle import BundleError, load_bundle, verify_bundle, write_manifest
from model.nn.differential import HEAD_META, HEAD_WEIGHTS, DifferentialError, DifferentialHead


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from tools.fixtures import write_labelled_images

    return write_labelled_images(tmp_path_factory.mktemp("labelled"), per_class=60, size=48, seed=0)


@pytest.fixture(scope="module")
def head_bundle(tiny_bundle, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("with-head") / "bundle"
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train-differential", "--data", str(labelled),
                           "--weights", str(tiny_bundle), "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "held-out (test) top-1" in proc.stdout
    return out


def test_training_beats_chance_by_far_and_calibration_lowers_ece(head_bundle):
    meta = json.loads((head_bundle / HEAD_META).read_text())
    test = meta["metrics"]["test"]
    assert meta["classes"] == ["eczema", "melanoma", "psoriasis", "vitiligo"] and test["n"] == 48
    assert test["top1"] >= 0.85 and test["chance"] == 0.25  # measured: 0.958 on the tiny bundle's features
    assert test["ece_after"] < test["ece_before"]  # temperature scaling, fitted on val, helps on test
    assert set(meta["metrics"]["feature_choice"]) == {"vit", "qformer", "both"}
    assert meta["feature"] == max(meta["metrics"]["feature_choice"], key=meta["metrics"]["feature_choice"].get)
    assert (head_bundle / "differential-reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_the_head_is_hashed_in_the_bundle_and_loaded_with_it(head_bundle):
    manifest = verify_bundle(head_bundle)
    assert {HEAD_WEIGHTS, HEAD_META} <= set(manifest["files"])
    loaded = load_bundle(head_bundle)
    assert loaded.differential is not None and loaded.differential.feature in ("vit", "qformer", "both")
    corrupt = head_bundle.parent / "corrupt"
    shutil.copytree(head_bundle, corrupt)
    data = bytearray((corrupt / HEAD_WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (corrupt / HEAD_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="differential.safetensors fails its sha256 check"):
        load_bundle(corrupt)


def test_a_ranking_for_one_to_three_photos(head_bundle, labelled):
    from model.prompt.conversation import ImageInput
    from model.serving.engine import Engine

    engine = Engine(load_bundle(head_bundle))
    photos = [ImageInput.of(Image.open(labelled.parent / "image" / f"melanoma-{i}.png").convert("RGB"))
              for i in (55, 56, 57)]
    ranking = engine.rank(photos)
    assert ranking.photos == 3 and ranking.top(1) == ["melanoma"]
    assert abs(sum(c.probability for c in ranking.conditions) - 1) < 0.01
    assert engine.rank(photos[:1]).top(1) == ["melanoma"]
    with pytest.raises(DifferentialError, match="1 to 3 photos"):
        engine.rank(photos + photos[:1])


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / HEAD_WEIGHTS).unlink(), "has differential.json but not differential.safetensors"),
    (lambda b: (b / HEAD_META).unlink(), "has differential.safetensors but not differential.json"),
    (lambda b: (b / HEAD_WEIGHTS).write_bytes(b"not safetensors at all"), "cannot be read"),
    (lambda b: (b / HEAD_META).write_text(json.dumps({**json.loads((b / HEAD_META).read_text()),
                                                       "classes": ["a", "b", "c"]})), "lists 3 conditions but"),
])
def test_a_missing_corrupt_or_mismatched_head_is_a_clear_error(head_bundle, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(head_bundle, broken)
    damage(broken)
    write_manifest(broken)  # hashes match again: only the head's own checks can object
    with pytest.raises((BundleError, DifferentialError), match=message):
        load_bundle(broken)


def test_ask_json_and_plain_ask_carry_the_ranking(head_bundle, labelled, tmp_path):
    photo = labelled.parent / "image" / "psoriasis-58.png"
    run = lambda *extra: subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(photo),  # noqa: E731
                                         "--weights", str(head_bundle), "--max-new-tokens", "6", "--lang", "en",
                                         *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    result = json.loads(run("--json").stdout)
    differential = result["differential"]
    assert differential[0]["condition"] == "psoriasis" and set(differential[0]) == {"condition", "probability"}
    assert isinstance(result["differential_uncertain"], bool)
    plain = run()
    assert plain.returncode == 0 and "Ranked differential" in plain.stdout and "psoriasis" in plain.stdout
    report = run("--report")
    assert "## Ranked differential" in report.stdout


def test_training_without_data_is_a_clear_cli_error(tiny_bundle, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train-differential", "--data",
                           str(tmp_path / "nothing.jsonl"), "--weights", str(tiny_bundle), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_the_head_round_trips_exactly(head_bundle, tmp_path):
    head = DifferentialHead.load(head_bundle)
    head.save(tmp_path)
    again = DifferentialHead.load(tmp_path)
    features = np.random.default_rng(0).normal(size=(2, head.weight.shape[1])).astype("float32")
    import torch

    x = torch.from_numpy(features)
    assert torch.equal(head.probabilities(x), again.probabilities(x)) and again.classes == head.classes


@pytest.fixture(scope="module")
def head_server(head_bundle, tmp_path_factory):
    from conftest import start_server

    yield from start_server(tmp_path_factory.mktemp("head-server"), SKINGPT_WEIGHTS=str(head_bundle))


def test_the_app_shows_the_ranking_beside_the_chat(head_server, labelled, tmp_path):
    import os

    from test_app_browser import CHROMIUM, FLAGS

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS, locale="en-US")
        page = context.new_page()
        page.goto(head_server.url, wait_until="domcontentloaded")
        page.wait_for_selector("#message textarea", timeout=60_000)
        page.set_input_files("#message input[type=file]", str(labelled.parent / "image" / "melanoma-58.png"))
        page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
        page.fill("#message textarea", "What is this?")
        page.press("#message textarea", "Enter")
        page.wait_for_selector("#differential li", timeout=60_000)
        items = page.locator("#differential li")
        assert items.count() == 4 and "melanoma" in items.first.inner_text()
        assert page.locator("#differential .bar span").count() == 4
        context.close()


def test_eval_score_reports_the_head_beside_the_chat(head_bundle, labelled, tmp_path):
    """eval predict on the held-out cases, then eval score: the head's accuracy by class and skin type
    with confidence intervals, its ECE before and after temperature scaling, and the reliability plot."""
    test_cases = [json.loads(line) for line in labelled.read_text().splitlines() if json.loads(line)["split"] == "test"]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"id": c["id"], "image": str(labelled.parent / c["image"]),
                                         "diagnosis": c["diagnosis"], "fitzpatrick": c["fitzpatrick"]}) + "\n"
                             for c in test_cases[::4]))
    labels = tmp_path / "labels.yaml"
    labels.write_text("classes:\n  psoriasis: []\n  vitiligo: []\n  melanoma: []\n  eczema: [atopic dermatitis]\n")
    run = tmp_path / "run"
    for command in (["predict", "--manifest", str(cases), "--out", str(run), "--max-new-tokens", "4"],
                    ["score", str(run), "--labels", str(labels), "--bootstrap", "50", "--json"]):
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "eval", *command, "--weights", str(head_bundle)]
                              if command[0] == "predict" else [sys.executable, str(ROOT / "launch.py"), "eval", *command],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    head = result["differential"]
    assert head["overall"]["n"] == 12 and head["overall"]["top1"]["value"] >= 0.75
    assert len(head["overall"]["top1"]["ci95"]) == 2 and set(head["per_class"]) == {"psoriasis", "vitiligo", "melanoma",
                                                                                      "eczema"}
    assert 0 <= head["ece_after"] <= 1 and 0 <= head["ece_before"] <= 1
    assert (run / "differential-reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Differential head (beside the chat)" in (run / "report.md").read_text()
