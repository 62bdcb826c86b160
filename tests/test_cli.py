"""The commands a user runs, end to end in a subprocess: inspect, fixtures, convert."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_inspect_13b_json_reports_published_figures():
    info = json.loads(_run("inspect", "--preset", "skingpt4-vicuna13b", "--json").stdout)
    p = info["parameters"]
    assert [round(p["vision"] / 1e6, 1), round(p["qformer"] / 1e6, 1), round(p["proj"] / 1e6, 1),
            round(p["llm"] / 1e9, 3)] == [985.9, 105.1, 3.9, 13.016]
    assert info["memory_bytes"]["nf4"]["llm"] < info["memory_bytes"]["int8"]["llm"] < info["memory_bytes"]["none"]["llm"]


def test_fixtures_convert_inspect(tmp_path):
    src = tmp_path / "src"
    _run("fixtures", "--out", str(src))
    out = _run("convert", "--llm", str(src / "vicuna"), "--vit", str(src / "eva_vit_g.pth"),
               "--blip2", str(src / "blip2_pretrained_flant5xxl.pth"), "--finetune", str(src / "skinGPT_v1.pth"),
               "--preset", "tiny", "--out", str(tmp_path / "bundle"))
    assert "supplied: proj (2 tensors)" in out.stdout and "bundle written to" in out.stdout
    text = _run("inspect", "--weights", str(tmp_path / "bundle")).stdout
    assert "sha256 verified" in text and "eva_vit_g.pth" in text
    info = json.loads(_run("inspect", "--weights", str(tmp_path / "bundle"), "--json").stdout)
    assert info["bundle"]["sha256_verified"] and info["name"] == "tiny"


def test_user_errors_have_no_traceback(tmp_path):
    proc = _run("convert", "--llm", str(tmp_path), "--vit", "x.pth", "--blip2", "y.pth", "--out",
                str(tmp_path / "b"), check=False)
    assert proc.returncode == 2
    assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("inspect", "--weights", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "no SkinGPT bundle at" in proc.stderr and "Traceback" not in proc.stderr
