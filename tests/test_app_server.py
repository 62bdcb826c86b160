"""A real server (`python launch.py`, demo bundle, free loopback port) driven through its named
API endpoints with gradio_client, as the README shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from conftest import ROOT

SETTINGS = (24, False, 1.0, 0.9)  # max new tokens, sampling, temperature, top-p


def _photo_with_gps(path):
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}
    pixels = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", exif=exif.tobytes())
    return path


def _session_files(server):
    return [p for p in (server.private / "sessions").rglob("*") if p.is_file()] if (server.private / "sessions").exists() else []


def test_photo_and_two_questions_then_new_patient(server, tmp_path):
    client = Client(server.url, verbose=False, download_files=False)
    photo = _photo_with_gps(tmp_path / "arm.jpg")

    first = client.predict({"text": "What is this?", "files": [handle_file(str(photo))]}, *SETTINGS, api_name="/ask")
    history = first[0]
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    shown = history[0]["content"][0]
    assert shown["type"] == "file" and shown["file"]["path"].endswith("photo-1.jpg")
    assert shown["file"]["path"].startswith(str(server.private / "sessions"))  # served from the private dir
    assert history[1]["content"] == [{"text": "What is this?", "type": "text"}]
    assert history[2]["content"][0]["text"]  # the (random) demo model answered something

    job = client.submit({"text": "What could cause it?", "files": []}, *SETTINGS, api_name="/ask")
    updates = list(job)
    assert len(updates) > 2, "the second answer arrives in pieces"
    final = job.outputs()[-1][0]
    assert len(final) == 5 and final[-1]["role"] == "assistant"

    # what the server keeps: one re-encoded photo, with no GPS (and no EXIF at all)
    kept = _session_files(server)
    assert len(kept) == 1 and kept[0].suffix == ".jpg"
    assert not Image.open(kept[0]).getexif() and b"GPS" not in kept[0].read_bytes()
    assert not any("arm.jpg" == p.name for p in server.private.rglob("*"))  # the original upload is gone

    markdown, files = client.predict(*SETTINGS, api_name="/report")  # the panel's opening is not API data
    ready, report = markdown.split("\n\n", 1)  # the page says it is ready, then shows it
    assert "report is ready" in ready and report.startswith("# Skin consultation report")
    assert "decision support" in report and "## Clinical history" in report and "## Photo quality" in report
    names = sorted(f["path"].rsplit("/", 1)[1] for f in files)
    assert names == ["skin-report-photo-1.jpg", "skin-report.md", "skin-report.pdf"]
    assert sorted(p.name for p in _session_files(server)) == ["photo-1.jpg", "skin-report-photo-1.jpg",
                                                             "skin-report.md", "skin-report.pdf"]

    client.predict(api_name="/new_patient")
    assert _session_files(server) == []
    log = server.output()
    assert "What could cause it?" not in log and "What is this?" not in log and "photo accepted" in log


def test_bad_upload_is_a_chat_message_and_the_server_keeps_running(server, tmp_path):
    client = Client(server.url, verbose=False, download_files=False)
    bogus = tmp_path / "scan.png"
    bogus.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    history = client.predict({"text": "Is this ok?", "files": [handle_file(str(bogus))]}, *SETTINGS, api_name="/ask")[0]
    texts = [m["content"] if isinstance(m["content"], str) else str(m["content"]) for m in history]
    assert any("could not be read" in t or "not a photo" in t for t in texts)
    good = _photo_with_gps(tmp_path / "ok.jpg")
    history = client.predict({"text": "And this one?", "files": [handle_file(str(good))]}, *SETTINGS, api_name="/ask")[0]
    assert history[-1]["role"] == "assistant" and not (history[-1].get("metadata") or {}).get("title")  # an answer


def test_non_loopback_bind_without_auth_refuses_to_start():
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0" in proc.stderr and "--auth" in proc.stderr


@pytest.mark.parametrize("env", [{"SKINGPT_HOST": "192.168.1.20"}, {"SKINGPT_HOST": "::", "SKINGPT_AUTH": "nocolon"},
                                 {"SKINGPT_HOST": "0.0.0.0", "SKINGPT_AUTH": "clinic:long-password"}])
def test_unsafe_settings_from_the_environment(env):
    import os

    proc = subprocess.run([sys.executable, str(ROOT / "launch.py")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 2 and ("refusing to listen" in proc.stderr or "user:password" in proc.stderr)
    if "SKINGPT_AUTH" in env and ":" in env["SKINGPT_AUTH"]:
        assert "use the API without a key" in proc.stderr  # a password for the page is not enough


def test_shutdown_removes_the_private_directory(server, tmp_path):
    """Its own server (the shared one stays up): SIGTERM, and nothing of any consultation remains."""
    import os
    import re
    import signal
    import time

    from conftest import _free_port

    env = {**os.environ, "SKINGPT_DEMO_BUNDLE": str(server.log.parent / "demo"), "SKINGPT_PORT": str(_free_port())}
    log = tmp_path / "log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "launch.py")], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    match = None
    for _ in range(240):
        match = re.search(r"running at (\S+)\s+\(private files: (\S+)\)", log.read_text())
        if match or process.poll() is not None:
            break
        time.sleep(0.5)
    assert match, log.read_text()
    private = match.group(2)
    client = Client(match.group(1), verbose=False, download_files=False)
    client.predict({"text": "", "files": [handle_file(str(_photo_with_gps(tmp_path / "p.jpg")))]}, *SETTINGS,
                   api_name="/ask")
    assert any(os.scandir(private))
    assert (os.stat(private).st_mode & 0o777) == 0o700
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert not os.path.exists(private)


# -- a hostile client speaking Gradio's queue protocol directly (issue 10) -----------------------------

def _fn_index(server, api_name):
    import httpx

    config = httpx.get(server.url + "config", timeout=30).json()
    return next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)


def _raw_call(server, api_name, data, session_hash):
    """queue/join with a session_hash of the client's choosing, then read the event stream to its end."""
    import json

    import httpx

    base = server.url + "gradio_api"
    joined = httpx.post(f"{base}/queue/join", json={"data": data, "fn_index": _fn_index(server, api_name),
                                                    "session_hash": session_hash, "trigger_id": None,
                                                    "event_data": None}, timeout=30)
    if joined.status_code != 200:
        return joined.status_code, None
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session_hash}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return 200, message.get("output")
    return 200, None


def _raw_upload(server, path):
    import httpx

    with open(path, "rb") as handle:
        response = httpx.post(server.url + "gradio_api/upload", files={"files": (path.name, handle, "image/jpeg")},
                              timeout=30)
    return response.json()[0]


def test_a_client_chosen_session_hash_never_becomes_a_path(server, tmp_path):
    import shutil
    import tempfile
    import time

    started = time.time()
    victim = Path(tempfile.mkdtemp(prefix="victim-", dir=server.private.parent))  # "../../NAME" from sessions/
    (victim / "keep.txt").write_text("precious")
    (server.private / "sessions").mkdir(exist_ok=True)
    hostile = [str(victim), "../../" + victim.name, "../" + victim.name, "x" * 3000, "é/../..", "%2F..%2F", "sessions"]
    for name in hostile:
        photo = _raw_upload(server, _photo_with_gps(tmp_path / "p.jpg"))
        status, output = _raw_call(server, "ask", [{"text": "What is it?", "files": [
            {"path": photo, "meta": {"_type": "gradio.FileData"}}]}, *SETTINGS], name)
        if status == 200:
            assert output and output.get("data"), (name, output)
        status, _ = _raw_call(server, "new_patient", [], name)
    kept = sorted(p.name for p in victim.iterdir())
    shutil.rmtree(victim)
    assert kept == ["keep.txt"]
    outside = [p for p in server.private.parent.glob("*/photo-1.jpg") if p.stat().st_mtime >= started]
    assert outside == []  # nothing written beside the server's root
    assert all(len(p.name) == 32 for p in (server.private / "sessions").iterdir())
    assert server.private.exists() and (server.private / "sessions").exists()


def test_cancelled_answers_keep_the_consultation_working(server, tmp_path):
    """The page's Stop fires /stop and cancels the job at once: after each, the next question works."""
    client = Client(server.url, verbose=False, download_files=False)
    photo = handle_file(str(_photo_with_gps(tmp_path / "arm.jpg")))
    client.predict({"text": "What is this?", "files": [photo]}, *SETTINGS, api_name="/ask")
    for attempt in range(6):
        job = client.submit({"text": f"Tell me more ({attempt})", "files": []}, 600, False, 1.0, 0.9, api_name="/ask")
        for _ in job:  # the first streamed update: the answer is under way
            break
        if attempt % 2:
            client.predict(api_name="/stop")
        job.cancel()
        history = client.predict({"text": "And then?", "files": []}, *SETTINGS, api_name="/ask")[0]
        asked = max(i for i, m in enumerate(history) if m["role"] == "user" and "And then?" in str(m["content"]))
        # its answer follows; a note may follow that too (on a slow machine the stopped answers run longer,
        # and the oldest turn's text is left out for room: the page says so)
        assert any(m["role"] == "assistant" and not (m.get("metadata") or {}).get("title")
                   for m in history[asked + 1:]), history[asked:]
    history = client.predict(*SETTINGS, api_name="/regenerate")[0]
    last = history[-1] if not (history[-1].get("metadata") or {}).get("title") else history[-2]
    assert last["role"] == "assistant" and not (last.get("metadata") or {}).get("title")
    if last is not history[-1]:  # greedy: the same answer again, and the page says so
        assert "The same answer again" in str(history[-1]["content"])


def test_new_patient_stops_a_running_report_on_the_server(server, tmp_path):
    """The report's answer is held (the test gate) after its first token, so New patient always
    lands while it is under way; the report's handler then returns having written nothing."""
    import time

    client = Client(server.url, verbose=False, download_files=False)
    before = set(_session_folders(server))
    client.predict({"text": "", "files": [handle_file(str(_photo_with_gps(tmp_path / "leg.jpg")))]}, *SETTINGS,
                   api_name="/ask")
    (mine,) = set(_session_folders(server)) - before
    since = server.mark()
    with server.holding():
        job = client.submit(600, False, 1.0, 0.9, api_name="/report")
        server.wait_for(r"decode held by the test gate batch=1", since)  # the report is under way
        client.predict(api_name="/new_patient")
        server.wait_for(r"answer cancelled after \d+ tokens", since)
    deadline = time.monotonic() + 120  # a safety net: the job ends as soon as its handler returns
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.done()
    assert not mine.exists()
    assert not any(p.name.startswith("skin-report") for p in _session_folders(server) if p not in before)


def _session_folders(server):
    root = server.private / "sessions"
    return list(root.iterdir()) if root.exists() else []


def test_two_clients_stream_at_the_same_time_and_each_gets_its_own_answer(server, tmp_path):
    """Answers are decoded in one batch: decoding is held (the test gate) until both answers are in
    it, so on a machine of any speed the two consultations' streams overlap in time."""
    import threading
    import time

    clients = [Client(server.url, verbose=False, download_files=False) for _ in range(2)]
    photos = [handle_file(str(_photo_with_gps(tmp_path / f"p{i}.jpg"))) for i in range(2)]
    for client, photo in zip(clients, photos):
        client.predict({"text": "", "files": [photo]}, *SETTINGS, api_name="/ask")
    stamps, finals = {}, {}

    def ask(i: int) -> None:
        job = clients[i].submit({"text": f"Question from patient {i}", "files": []}, 400, False, 1.0, 0.9,
                                api_name="/ask")
        stamps[i] = [time.monotonic() for _ in job]
        finals[i] = job.outputs()[-1][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    since = server.mark()
    with server.holding():
        [t.start() for t in threads]
        server.wait_for(r"decode held by the test gate batch=2", since)  # both answers are in one batch
    [t.join(120) for t in threads]
    assert len(stamps[0]) > 3 and len(stamps[1]) > 3, "both answers streamed"
    assert stamps[0][0] < stamps[1][-1] and stamps[1][0] < stamps[0][-1], "the two streams overlapped in time"
    for i in range(2):
        questions = [m["content"] for m in finals[i] if m["role"] == "user" and isinstance(m["content"], list)
                     and m["content"][0].get("type") == "text"]
        assert questions[-1][0]["text"] == f"Question from patient {i}" and finals[i][-1]["role"] == "assistant"
    assert "up to 8 answers at once" in server.output()
