"""`serve --engine-url`'s client against engines that misbehave: down, refusing our key, erroring,
or sending what is not an answer. Every case is one clear message and a kept consultation; the
well-behaved engine is tests/test_vllm.py's real vLLM."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import _free_port

from app.remote_engine import EngineUnavailable, RemoteEngine
from model.prompt.conversation import Conversation, ImageInput
from model.weights.bundle import load_bundle


class _Hostile(http.server.BaseHTTPRequestHandler):
    reply: tuple[int, bytes] = (200, b"")
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", 0))
        type(self).seen.append(json.loads(self.rfile.read(length)))
        self._send()

    def do_GET(self) -> None:  # noqa: N802
        self._send()

    def _send(self) -> None:
        status, body = type(self).reply
        self.send_response(status)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return load_bundle(tiny_bundle)


def _ask() -> Conversation:
    image = ImageInput.of(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    return Conversation().ask("What is it?", [image])


def _answer(engine: RemoteEngine) -> str:
    return "".join(engine.stream(_ask(), do_sample=False, max_new_tokens=8))


def test_an_engine_that_is_down_is_said_in_one_line(loaded):
    engine = RemoteEngine(loaded.config, loaded.tokenizer, f"http://127.0.0.1:{_free_port()}/v1")
    with pytest.raises(EngineUnavailable, match="not reachable .* Start it .* the consultation is kept"):
        _answer(engine)
    with pytest.raises(EngineUnavailable, match="not reachable"):
        engine.probe()


@pytest.mark.parametrize("reply, says", [
    ((401, b'{"error": {"message": "bad key"}}'), "refused our key .* --engine-key"),
    ((500, b'{"error": {"message": "EngineCore died\\u0007"}}'), "answered HTTP 500: EngineCore died\\. "),
    ((200, b"data: {not json\n\n"), "sent an event that is not JSON"),
    ((200, b'data: {"choices": [{"delta": {"content": 7}}]}\n\n'), "of the wrong type"),
    ((200, b'data: {"choices": [{"delta": {"content": "x"}, "token_ids": ["a"]}]}\n\n'), "of the wrong type"),
    ((200, b"data: " + b'"' + b"x" * (2**20 + 10) + b'"\n\n'), "over 1 MiB"),
    ((200, b'data: {"choices": [{"delta": {"content": "' + b"y" * 4000 + b'"}}]}\n\n'), "more text than"),
    ((200, b'data: {"error": {"message": "out of KV blocks"}}\n\n'), "HTTP 500: out of KV blocks"),
])
def test_what_is_not_an_answer_stops_the_answer_with_a_clear_message(hostile, loaded, reply, says):
    _Hostile.reply = reply
    engine = RemoteEngine(loaded.config, loaded.tokenizer, hostile, key="engine-key-0123456789")
    with pytest.raises(EngineUnavailable, match=says):
        _answer(engine)


def test_what_goes_out_is_the_conversation_and_nothing_of_the_server(hostile, loaded):
    """The request: our template's stop, greedy as asked, the photo as PNG, a salt per consultation."""
    _Hostile.reply, _Hostile.seen = (200, b'data: {"choices": [{"delta": {"content": " Red"}, "token_ids": [5]}]}\n\n'
                                          b"data: [DONE]\n\n"), []
    engine = RemoteEngine(loaded.config, loaded.tokenizer, hostile)
    first = engine.stream(_ask(), session="patient-a", do_sample=False, max_new_tokens=8)
    assert "".join(first) == " Red" and first.tokens == [5] and first.finish_reason == "stop"
    "".join(engine.stream(_ask(), session="patient-b", do_sample=False, max_new_tokens=8))
    a, b = _Hostile.seen
    assert a["stop"] == ["###"] and a["temperature"] == 0.0 and a["max_tokens"] == 8
    assert a["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert a["messages"][0]["content"][1] == {"type": "text", "text": "What is it?"}
    assert a["cache_salt"] != b["cache_salt"]  # two patients never share a cached prefix
