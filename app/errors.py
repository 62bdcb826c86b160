"""The HTTP side's one error vocabulary: the API's body (OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`) and the page's plain sentence. The API's routes, the guard in front of every
route and the page's upload route all answer a refusal through `refusal`."""

from __future__ import annotations

import json
from typing import Any


def api_body(message: str, code: str | None = None, param: str | None = None,
             kind: str = "invalid_request_error") -> dict[str, Any]:
    """An API error as its JSON object (`kind` is OpenAI's `type`: invalid_request_error | server_error)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sentence(message: str) -> str:
    """A refusal as the page's plain text: one sentence, capitalised, ending in a full stop."""
    message = message.strip()
    return message[:1].upper() + message[1:] + ("" if message.endswith((".", "!", "?")) else ".")


def refusal(message: str, code: str | None, api: bool, param: str | None = None,
            kind: str = "invalid_request_error") -> tuple[bytes, str]:
    """(body, content type) of a refusal: the API's JSON on API paths, else the page's sentence."""
    if api:
        return json.dumps(api_body(message, code, param, kind)).encode(), "application/json"
    return (sentence(message) + "\n").encode(), "text/plain; charset=utf-8"
