"""Shared fixtures: tiny source files in the published formats and a bundle converted from them."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# bundle verification records of test runs (and of the servers they start) stay out of ~/.cache
os.environ.setdefault("SKINGPT_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="skingpt-test-cache-"))

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    real = os.environ.get("SKINGPT_REAL_WEIGHTS")
    skip_real = pytest.mark.skip(reason="set SKINGPT_REAL_WEIGHTS=DIR (a converted full-size bundle) to run")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "real_weights" in item.keywords and not real:
            item.add_marker(skip_real)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    from tools.fixtures import write_sources

    return write_sources(tmp_path_factory.mktemp("sources"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(sources, tmp_path_factory) -> Path:
    from model.weights.convert import Sources, convert

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=sources.finetune),
            out, preset_name="tiny", log=lambda _: None)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process, url: str, private: Path, log: Path, gate: Path):
        self.process, self.url, self.private, self.log, self.gate = process, url, private, log, gate

    def output(self) -> str:
        return self.log.read_text()

    def mark(self) -> int:
        """Where the log ends now: `wait_for` looks only at what comes after it."""
        return len(self.output())

    def wait_for(self, pattern: str, since: int = 0, limit_s: float = 120) -> re.Match:
        """The first line matching `pattern` logged after `since` (the limit is a safety net, not the test)."""
        import time

        deadline = time.monotonic() + limit_s
        while not (match := re.search(pattern, self.output()[since:])):
            assert self.process.poll() is None, f"the server stopped:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"no {pattern!r} in the log within {limit_s} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)
        return match

    @contextmanager
    def holding(self):
        """Decoding holds while inside (the SKINGPT_TEST_DECODE_GATE hook): an answer started in here
        stays under way, after its first token, until the block ends."""
        self.gate.touch()
        try:
            yield
        finally:
            self.gate.unlink(missing_ok=True)


def start_server(work: Path, **env_extra: str):
    """`python launch.py` as a user starts it (loopback, a free port); yields a Server, then stops it."""
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    gate = work / "decode-gate"
    env = {**os.environ, "SKINGPT_DEMO_BUNDLE": str(work / "demo"), "SKINGPT_PORT": str(port),
           "SKINGPT_TEST_DECODE_GATE": str(gate), **env_extra}
    log = work / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "launch.py")], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    match = None
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(r"running at (http://127\.0\.0\.1:\d+/)\s+\(private files: (\S+)\)", log.read_text())
        if match:
            break
        time.sleep(0.5)
    if not match:
        process.kill()
        pytest.fail(f"server did not start:\n{log.read_text()}")
    server = Server(process, match.group(1), Path(match.group(2)), log, gate)
    yield server
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    server.stopped = True


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The demo bundle, generated on first start as a new user sees it."""
    yield from start_server(tmp_path_factory.mktemp("server"))


API_KEY = "test-key-0123456789"
SECOND_KEY = "second-caller-key-0123456789"  # another caller: a prefix cache of its own


@pytest.fixture(scope="session")
def api_server(server, tmp_path_factory):
    """A second server with an API key and one answer at a time (to see a dropped stream free its slot)."""
    import shutil

    work = tmp_path_factory.mktemp("api-server")
    shutil.copytree(server.log.parent / "demo", work / "demo")
    yield from start_server(work, SKINGPT_API_KEY=f"{API_KEY},{SECOND_KEY}", SKINGPT_MAX_BATCH="1")
