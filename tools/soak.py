"""A soak: a real server (`python launch.py`, the demo bundle unless --weights) under web and API
clients for a while, its memory sampled as it goes. Does RSS level off?

    python -m tools.soak --minutes 30 --web 8 --api 4

Web clients speak Gradio's protocol (gradio_client): a photo, two questions, now and then a
report, then New patient. API clients send a photo and a follow-up, half of them with a
`prompt_cache_key`. Every `--every` seconds the server's RSS, its open files and what it answered
are printed as one line; at the end a JSON summary (the RSS series, answers, failures).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (24, False, 1.0, 0.9)  # the page's sliders: max new tokens, sampling, temperature, top-p


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers = self.failures = 0
        self.errors: dict[str, int] = {}

    def ok(self) -> None:
        with self.lock:
            self.answers += 1

    def fail(self, err: BaseException) -> None:
        with self.lock:
            self.failures += 1
            self.errors[type(err).__name__] = self.errors.get(type(err).__name__, 0) + 1


def web_client(url: str, photos: list[Path], stop: threading.Event, tally: Tally, n: int) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    round_ = 0
    while not stop.is_set():
        round_ += 1
        try:
            photo = photos[(n + round_) % len(photos)]  # clients share photos, as two tabs of one clinician do
            history = client.predict({"text": "What is it?", "files": [handle_file(str(photo))]}, *SETTINGS,
                                     api_name="/ask")[0]
            if "Cannot do that" in json.dumps(history):
                raise RuntimeError("refused")
            client.predict({"text": "What could cause it?", "files": []}, *SETTINGS, api_name="/ask")
            tally.ok()
            if round_ % 5 == 0:
                client.predict(*SETTINGS, api_name="/report")
            client.predict(api_name="/new_patient")
            tally.ok()
        except Exception as err:  # noqa: BLE001 - counted; the soak goes on
            tally.fail(err)
            time.sleep(1)


def api_client(url: str, photos: list[bytes], stop: threading.Event, tally: Tally, n: int) -> None:
    import httpx

    round_ = 0
    while not stop.is_set():
        round_ += 1
        data = "data:image/jpeg;base64," + base64.b64encode(photos[(n + round_) % len(photos)]).decode()
        ask = {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                           {"type": "image_url", "image_url": {"url": data}}]}
        body = {"model": "demo", "messages": [ask], "max_tokens": 24, "temperature": 0}
        if n % 2:
            body["prompt_cache_key"] = f"soak-{n}-{round_}"
        try:
            first = httpx.post(url + "v1/chat/completions", json=body, timeout=300)
            first.raise_for_status()
            answer = first.json()["choices"][0]["message"]["content"]
            body["messages"] = [ask, {"role": "assistant", "content": answer},
                                {"role": "user", "content": "What could cause it?"}]
            httpx.post(url + "v1/chat/completions", json=body, timeout=300).raise_for_status()
            tally.ok()
            tally.ok()
        except Exception as err:  # noqa: BLE001
            tally.fail(err)
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--web", type=int, default=8, help="web clients (gradio_client)")
    parser.add_argument("--api", type=int, default=4, help="API clients (httpx)")
    parser.add_argument("--every", type=float, default=60, help="seconds between samples")
    parser.add_argument("--weights", help="a bundle (default: the demo bundle)")
    parser.add_argument("--kv-cache-gb", type=float, help="SKINGPT_KV_CACHE_GB of the server (default: its own)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="skingpt-soak-"))
    port = _free_port()
    env = {**os.environ, "SKINGPT_PORT": str(port), "SKINGPT_DEMO_BUNDLE": str(work / "demo")}
    if args.weights:
        env["SKINGPT_WEIGHTS"] = args.weights
    if args.kv_cache_gb:
        env["SKINGPT_KV_CACHE_GB"] = str(args.kv_cache_gb)
    log = work / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "launch.py")], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"running at (\S+)", log.read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        return _soak(args, url, server.pid, work)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _soak(args, url: str, pid: int, work: Path) -> int:
    photos = [_photo(seed) for seed in range(3)]
    paths = []
    for i, data in enumerate(photos):
        paths.append(work / f"photo-{i}.jpg")
        paths[-1].write_bytes(data)
    stop, tally = threading.Event(), Tally()
    clients = [threading.Thread(target=web_client, args=(url, paths, stop, tally, n), daemon=True)
               for n in range(args.web)]
    clients += [threading.Thread(target=api_client, args=(url, photos, stop, tally, n), daemon=True)
                for n in range(args.api)]
    started = time.monotonic()
    series = [{"s": 0, **_status(pid), "answers": 0, "failures": 0}]
    print(f"{'s':>6} {'RSS MB':>8} {'peak MB':>8} {'threads':>7} {'fds':>5} {'answers':>8} {'failures':>8}")
    for client in clients:
        client.start()
    end = started + args.minutes * 60
    while time.monotonic() < end:
        time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        sample = {"s": round(time.monotonic() - started), **_status(pid), "answers": tally.answers,
                  "failures": tally.failures}
        series.append(sample)
        print(f"{sample['s']:>6} {sample['VmRSS'] / 1024:>8.0f} {sample['VmHWM'] / 1024:>8.0f} "
              f"{sample['Threads']:>7} {sample['fds']:>5} {sample['answers']:>8} {sample['failures']:>8}", flush=True)
    stop.set()
    for client in clients:
        client.join(timeout=120)
    print(json.dumps({"minutes": args.minutes, "web_clients": args.web, "api_clients": args.api,
                      "answers": tally.answers, "failures": tally.failures, "errors": tally.errors,
                      "rss_mb": [round(s["VmRSS"] / 1024) for s in series], "every_s": args.every}))
    return 0 if tally.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
