"""The OpenAI-compatible API on a real server (`python launch.py`, demo bundle), driven by the official
`openai` client and by raw HTTP: answers about inline photos, streaming, follow-ups that reuse the
cached prefix, refusals in the API's error format, keys, and a dropped stream freeing its slot."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import API_KEY, ROOT, SECOND_KEY

MODEL = "demo"


def _data_url(fmt: str = "JPEG", data: bytes | None = None, mime: str = "image/jpeg") -> str:
    if data is None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buffer, fmt)
        data = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _ask(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_loaded_bundle(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["prompt_template"] == "skingpt4"


def test_a_whole_answer_about_an_inline_photo(client, api_server):
    response = client.chat.completions.create(model=MODEL, messages=[_ask("What is this rash?", _data_url())],
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 32 and 0 < response.usage.completion_tokens <= 12
    assert not list((api_server.private / "sessions").glob("**/*")) if (api_server.private / "sessions").exists() \
        else True  # nothing of an API request is written to disk
    assert not [p for p in api_server.private.rglob("*") if p.is_file() and p.name != ".owner"]
    assert "What is this rash?" not in api_server.output()


def test_a_streamed_answer_and_its_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[_ask("Describe it.", _data_url("PNG", mime="image/png"))],
                                            max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0
    assert text == text.lstrip()


def test_a_follow_up_sends_the_history_and_reuses_the_cached_prefix(client, api_server):
    """With a key per caller (this server holds two), a caller's follow-up reuses its own cache."""
    photo = _data_url(data=_jpeg_of_seed(11))
    first_messages = [_ask("What is it?", photo)]
    first = client.chat.completions.create(model=MODEL, messages=first_messages, max_tokens=10, temperature=0)
    history = first_messages + [{"role": "assistant", "content": first.choices[0].message.content},
                                {"role": "user", "content": "What could cause it?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 32 and second.usage.prompt_tokens - cached < 40  # only the new tail was prefilled
    # the other key is another caller: the same photo and words reuse nothing of the first caller's
    other = openai.OpenAI(base_url=api_server.url + "v1", api_key=SECOND_KEY, max_retries=0, timeout=120)
    probe = other.chat.completions.create(model=MODEL, messages=history, max_tokens=10, temperature=0)
    assert probe.usage.prompt_tokens_details.cached_tokens == 0


def _jpeg_of_seed(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("change, status, code", [
    ({"n": 2}, 400, "unsupported_value"),
    ({"messages": [_ask("What is it?", "https://example.org/rash.jpg")]}, 400, "image_url_not_allowed"),
    ({"messages": [_ask("What is it?", "data:image/jpeg;base64,@@not base64@@")]}, 400, "invalid_base64"),
    ({"messages": [_ask("What is it?", _data_url(data=b"just some text, not a photo at all"))]}, 400, "invalid_image"),
    ({"messages": [_ask("What is it?", _data_url(data=_png_header_only(10_000, 5_000), mime="image/png"))]}, 413,
     "image_too_large"),
    ({"messages": [_ask("What is it?")]}, 400, "image_required"),
    ({"model": "gpt-4o"}, 404, "model_not_found"),
    ({"temperature": 7}, 400, "invalid_value"),
    ({"clinical_history": {"age": "old"}}, 400, "invalid_value"),
    ({"clinical_history": {"body_site": "back", "allergies": "none"}}, 400, "invalid_value"),
])
def test_bad_requests_get_clear_errors_in_the_api_format(api_server, change, status, code):
    body = {"model": MODEL, "messages": [_ask("What is it?", _data_url())], "max_tokens": 4, **change}
    response = httpx.post(api_server.url + "v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text


def test_clinical_history_and_photo_quality_extension_fields(client):
    """`clinical_history` (validated like the form) goes into the prompt: more prompt tokens; a malformed
    one names its field. `photo_quality` comes back per photo, whole or streamed."""
    messages = [_ask("What is it?", _data_url(data=_jpeg_of_seed(21)))]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    history = {"age": 70, "body_site": "face", "symptoms": ["bleeding"], "changes": ["size"], "fitzpatrick": "II"}
    told = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"clinical_history": history})
    assert told.usage.prompt_tokens > plain.usage.prompt_tokens + 15
    assert plain.model_extra["photo_quality"] == [{"ok": False, "problems": ["small", "little_skin"], "notes": []}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                       extra_body={"clinical_history": {"age": 300}})
    assert err.value.body["param"] == "clinical_history.age" and "120" in err.value.body["message"]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                            extra_body={"clinical_history": history})
    first = next(iter(stream))
    assert first.model_extra["photo_quality"][0]["problems"] == ["small", "little_skin"]
    stream.close()


def test_the_official_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="never fetches URLs"):
        client.chat.completions.create(model=MODEL, messages=[_ask("What?", "http://example.org/a.jpg")], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[_ask("What?", _data_url())], max_tokens=4)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": API_KEY}])
def test_a_missing_or_wrong_key_is_refused(api_server, headers):
    for method, path, body in (("GET", "v1/models", None), ("POST", "v1/chat/completions", {"model": MODEL})):
        response = httpx.request(method, api_server.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_raw_server_sent_events(api_server):
    body = {"model": MODEL, "messages": [_ask("Describe it.", _data_url())], "max_tokens": 8, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", api_server.url + "v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and "usage" not in chunks[0]


def test_a_dropped_stream_frees_its_slot(api_server, client):
    """One answer at a time on this server: a client that goes away must not hold the slot."""
    body = {"model": MODEL, "messages": [_ask("Describe it at length.", _data_url())], "max_tokens": 900,
            "stream": True, "temperature": 1.0, "seed": 1, "stop": ["this never appears in a demo answer"]}
    with httpx.stream("POST", api_server.url + "v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n > 3:
                break  # and hang up
    after = client.chat.completions.create(model=MODEL, messages=[_ask("What is it?", _data_url())], max_tokens=4,
                                           temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")
    log = api_server.output()
    cancelled = list(re.finditer(r"answer cancelled after (\d+) tokens", log))
    assert cancelled and int(cancelled[-1].group(1)) < 900  # the scheduler let it go early ...
    assert cancelled[-1].start() < log.rindex("api answer prompt=")  # ... before the next answer was done


def test_readme_examples_work_as_written(api_server, tmp_path):
    """The README's Python and curl examples, against this server (its port and key)."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use it from any OpenAI client"):]
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    curl = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    port = api_server.url.rstrip("/").rsplit(":", 1)[1]
    env = {"SKINGPT_API_KEY": API_KEY, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    python = python.replace("127.0.0.1:7860", f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    curl = curl.replace("127.0.0.1:7860", f"127.0.0.1:{port}")
    result = subprocess.run(["bash", "-c", curl], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and '"chat.completion"' in result.stdout, result.stdout + result.stderr


def test_api_photos_count_against_the_servers_photo_memory():
    """The API's photos are taken in as the page's are, and refused (503, Retry-After) when the
    server's decoded-photo memory, shared with the page's consultations, has no room for them."""
    from types import SimpleNamespace

    from app.api.chat import APIError, ChatAPI
    from model.nn.config import preset

    asked: list[int] = []
    engine = SimpleNamespace(config=preset("tiny"), max_batch=1)
    full = ChatAPI(engine, MODEL, photo_room=lambda n: asked.append(n) or False)
    body = {"model": MODEL, "messages": [_ask("What is this?", _data_url())]}
    with pytest.raises(APIError) as refused:
        full.prepare(body)
    assert refused.value.status == 503 and refused.value.code == "server_busy"
    assert refused.value.headers == {"Retry-After": "30"} and asked == [96 * 128 * 3]
    prepared = ChatAPI(engine, MODEL).prepare(body)  # room: the photo is taken in, its quality and notes said
    assert prepared.prompt_images == 1 and prepared.photo_quality[0]["notes"] == []
