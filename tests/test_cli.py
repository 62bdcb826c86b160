"""The commands a user runs, end to end in a subprocess: inspect, fixtures, convert."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert "`python launch.py convert`" in proc.stderr  # the library's "convert command", as this front-end runs it


def test_library_errors_name_settings_and_commands_for_their_reader():
    """A library message names `{setting:...}` / `{command:...}`: a Python caller reads the setting's
    name, the terminal its flag and variable and the command line to type."""
    from model.errors import UserFacingError, spell

    err = UserFacingError("lower {setting:max_batch} or run {command:quantize --mode q4_0}")
    assert str(err) == "lower the max_batch setting or run SkinGPT's `quantize --mode q4_0` command"
    assert err.for_cli() == "lower --max-batch / SKINGPT_MAX_BATCH or run `python launch.py quantize --mode q4_0`"
    assert spell("no marks {here}") == "no marks {here}"


def _demo_env(tmp_path):
    import os

    return {**os.environ, "SKINGPT_DEMO_BUNDLE": str(tmp_path / "demo")}


def test_ask_end_to_end_on_the_demo_bundle(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "p.jpg")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(tmp_path / "p.jpg"),
                           "--question", "What is this rash?", "--json", "--max-new-tokens", "12", "--seed", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Using the DEMO bundle" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["question"] == "What is this rash?" and result["finish_reason"] in ("stop", "eos", "length")
    assert "decision support" in result["disclaimer"]
    assert (tmp_path / "demo" / "manifest.json").is_file()

    report = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(tmp_path / "p.jpg"),
                             "--report", "--json", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert report.returncode == 0, report.stderr
    assert set(json.loads(report.stdout)["answers"]) == {"describe", "features", "causes", "treatment", "see_doctor"}

    bad = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(ROOT / "README.md")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert bad.returncode == 2 and "not a photo this app can read" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_streams_in_a_terminal_session(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    script = "Hello?\n/image " + str(tmp_path / "p.png") + "\nWhat is it?\nAnd the cause?\n/new\n/quit\n"
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "chat", "--max-new-tokens", "6"], input=script,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Please add a photo first" in proc.stderr and "Photo added" in proc.stderr
    assert proc.stdout.count("skingpt> ") == 2 and "New consultation" in proc.stderr


def test_bench_tiny_random_init_json():
    result = json.loads(_run("bench", "--preset", "tiny", "--random-init", "--json", "--turns", "3").stdout)
    assert [row["turn"] for row in result["followups"]] == [1, 2, 3]
    for row in result["followups"]:
        assert row["prefill_tokens"] < row["prompt_tokens"] and row["baseline_ttft_ms"] > 0 and row["speedup"] > 0
    assert result["decode_tokens_per_s"] > 0 and result["bare_decode_tokens_per_s"] > 0
    api = result["api_followups"]  # the same follow-ups through the OpenAI-compatible API's path
    assert [row["turn"] for row in api] == [1, 2, 3]
    assert api[0]["cached_tokens"] > 32  # at least the photo and the first question
    # each request reuses all of the previous one's prompt (the random model's answer text may re-tokenise
    # differently from what it generated, so the answer itself is not always reused)
    assert all(now["cached_tokens"] >= before["prompt_tokens"] for before, now in zip(api, api[1:]))
    assert result["peak_rss_bytes"] > 0


def _choices(parser, command: str, flag: str) -> tuple:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_every_front_end_offers_the_choices_of_model_choices():
    import typing

    from app.settings import AppSettings
    from cli.main import build_parser
    from model import choices
    from model.nn.config import PRESETS

    parser = build_parser()
    assert _choices(parser, "ask", "--quantize") == choices.QUANTIZE
    assert _choices(parser, "serve", "--quantize") == choices.QUANTIZE
    assert _choices(parser, "ask", "--dtype") == choices.DTYPES
    assert _choices(parser, "quantize", "--mode") == choices.BUNDLE_QUANTIZE
    assert _choices(parser, "quantize", "--encoder") == choices.ENCODER_STORAGE
    assert _choices(parser, "bench", "--preset") == choices.PRESETS and set(PRESETS) == set(choices.PRESETS)
    assert typing.get_args(AppSettings.model_fields["quantize"].annotation) == choices.QUANTIZE
    assert typing.get_args(AppSettings.model_fields["dtype"].annotation) == choices.DTYPES
    # one default, wherever it is read
    from model.weights.policy import LoadPolicy

    args = parser.parse_args(["ask", "--image", "x.jpg"])
    assert (args.quantize, args.dtype, args.device) == (LoadPolicy().quantize, LoadPolicy().dtype, LoadPolicy().device)
    assert (AppSettings().quantize, AppSettings().dtype) == (LoadPolicy().quantize, LoadPolicy().dtype)


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cuda:x", "gpu", "CPU", "cuda:0 "])
def test_a_device_is_refused_alike_by_the_cli_the_settings_and_the_load_policy(device, capsys):
    from pydantic import ValidationError

    from app.settings import AppSettings
    from cli.main import build_parser
    from model.weights.policy import LoadPolicy, PolicyError

    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "--image", "x.jpg", "--device", device])
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        AppSettings(device=device)
    with pytest.raises(PolicyError, match="device must be auto, cpu, cuda or cuda:N"):
        LoadPolicy(device=device)
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert LoadPolicy(device=good).device == AppSettings(device=good).device == good


def test_bad_arguments_are_refused_before_anything_loads(tmp_path):
    """Each in one plain line, with the command's own usage, before any model is loaded or generated."""

    from tools.fixtures import skin_photo

    skin_photo(0, size=(320, 240)).save(tmp_path / "p.jpg")
    photo = str(tmp_path / "p.jpg")
    (tmp_path / "bad.yaml").write_text("age: [1\n")
    cases = [(("ask", "--image", photo, "--quantize", "int3"), "invalid choice: 'int3'"),
             (("ask", "--image", photo, "--dtype", "fp8"), "invalid choice: 'fp8'"),
             (("ask", "--image", photo, "--device", "gpu"), "device must be auto, cpu, cuda or cuda:N (a GPU's number), not 'gpu'"),
             (("ask", "--image", str(tmp_path / "none.jpg")), "does not exist."),
             (("ask", "--image", photo, "--weights", str(tmp_path / "no-bundle")), "--weights"),
             (("ask", "--image", photo, "--pdf", "r.pdf"), "--pdf writes the report: add --report"),
             (("ask", "--image", photo, "--history", str(tmp_path / "bad.yaml")), "is not YAML or JSON"),
             (("bench", "--preset", "huge"), "invalid choice: 'huge'"),
             (("ask", "--image", photo, "--max-new-tokens", "-5"), "--max-new-tokens must be between 1 and 1023"),
             (("ask", "--image", photo, "--max-new-tokens", "100000"), "this model's context holds 1024 positions"),
             (("chat", "--max-new-tokens", "0"), "--max-new-tokens must be between 1 and 1023"),
             (("ask", "--image", photo, "--temperature", "-1"), "--temperature must be 0 (greedy) or more"),
             (("chat", "--top-p", "2"), "--top-p must be above 0 and at most 1"),
             (("ask", "--image", photo, "--bogus"), "launch.py ask: error: unrecognized arguments: --bogus")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env=_demo_env(tmp_path))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "demo").exists()  # nothing was generated or loaded
    help_text = _run("ask", "--help").stdout
    assert "{auto,fp32,fp16,bf16}" in help_text and "--history FILE" in help_text


def test_ask_with_a_history_file_and_the_photo_quality(tmp_path):
    from PIL import ImageFilter

    from tools.fixtures import skin_photo

    skin_photo(0, size=(320, 240)).filter(ImageFilter.GaussianBlur(3)).save(tmp_path / "blur.jpg")
    (tmp_path / "h.json").write_text(json.dumps({"age": 66, "symptoms": ["bleeding"], "fitzpatrick": "IV"}))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(tmp_path / "blur.jpg"),
                           "--history", str(tmp_path / "h.json"), "--json", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["photo_quality"]["ok"] is False and result["photo_quality"]["problems"] == ["blurry"]
    assert result["clinical_history"] == {"fitzpatrick": 4, "age": 66, "symptoms": ["bleeding"]}
    report = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(tmp_path / "blur.jpg"),
                             "--history", str(tmp_path / "h.json"), "--report", "--max-new-tokens", "4"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert report.returncode == 0, report.stderr
    assert "note: This photo may be hard to judge: It looks blurred." in report.stderr
    assert "- Age (years): 66" in report.stdout and "Photo 1: It looks blurred." in report.stdout
    assert "Visit reference: SG-" in report.stdout and "Model: demo" in report.stdout


def test_chat_commands_are_not_sent_to_the_model(tmp_path):
    from tools.fixtures import skin_photo

    from PIL import ImageFilter

    skin_photo(0, size=(320, 240)).save(tmp_path / "p.png")
    skin_photo(0, size=(320, 240)).filter(ImageFilter.GaussianBlur(3)).save(tmp_path / "blur.png")
    (tmp_path / "h.yaml").write_text("age: 50\nchanges: [colour]\n")
    script = (f"/help\n/bogus\n/image {tmp_path / 'p.png'}\n/history {tmp_path / 'h.yaml'}\nWhat is it?\n"
              f"/image {tmp_path / 'blur.png'}\n/quit\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "chat", "--max-new-tokens", "4"], input=script,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "/help shows this" in proc.stderr and "Unknown command /bogus." in proc.stderr
    assert "Clinical history set" in proc.stderr and proc.stdout.count("skingpt> ") == 1
    assert "a mole or spot that is new or changing" in proc.stderr  # the history's warning sign
    # /image checks the photo as it arrives, as the page and `ask` do: once, for the blurred one
    assert proc.stderr.count("note: This photo may be hard to judge: It looks blurred.") == 1


def test_serve_on_a_taken_port_says_so_before_loading(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--port", str(port)], capture_output=True,
                              text=True, timeout=60, cwd=ROOT, env=_demo_env(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in output and "--port N or SKINGPT_PORT" in output
    assert "Traceback" not in output and "[1/3]" not in output  # nothing was loaded
