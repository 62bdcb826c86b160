"""Each private file is served only to the browser whose consultation made it.

Gradio serves any file under its cache folder (our private root) to whoever names its path
(`/gradio_api/file=PATH`). The path holds a server-drawn id, but paths get out: a screenshot, a
copied link, a shared log, the browser's history. So the page also gives each browser a random
session cookie (HttpOnly, SameSite=Strict, gone when the browser closes; no one else's, never in a
log), the server notes which browser each consultation and each upload folder belongs to, and a
request for a file there is answered only when it carries that browser's cookie. Any other gets
404, as if there were no such file.

A consultation started without the cookie (a script driving Gradio's own API, or a browser that
refuses cookies) belongs to no browser: its files go to requests without one, as before this layer,
where the id in the path is the only key.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Callable

from starlette.requests import cookie_parser

from app.errors import refusal
from app.privacy import SESSIONS, UPLOADS

COOKIE = "skingpt_browser"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")

Owner = Callable[[str, str], "tuple[bool, str | None]"]  # (area, folder) -> (known, its browser)


def browser_of(cookies: dict[str, str] | None) -> str | None:
    """The browser's token from a request's cookies; None when absent or malformed."""
    token = (cookies or {}).get(COOKIE)
    return token if token is not None and _TOKEN.fullmatch(token) else None


def same_browser(owner: str | None, browser: str | None) -> bool:
    if owner is None or browser is None:
        return owner is None and browser is None
    return hmac.compare_digest(owner, browser)


class OwnFiles:
    """An ASGI layer: gives a page its browser cookie, and serves a private file only to its browser.

    `owner(area, folder)` says whether a folder of the private root is known and whose it is
    (`area` is "sessions" or "uploads")."""

    def __init__(self, app, root: Path, owner: Owner) -> None:
        self.app, self.owner = app, owner
        self.root = Path(os.path.realpath(root))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        browser = browser_of(_cookies(scope))
        path = scope.get("path", "")
        route = next((r for r in FILE_ROUTES if path.startswith(r)), None)
        if route is not None and not self._may_read(path[len(route):], browser):
            body, kind = refusal("no such file", "not_found", api=False)
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        if browser is not None:
            return await self.app(scope, receive, send)
        await self.app(scope, receive, _with_cookie(send))

    def _may_read(self, named: str, browser: str | None) -> bool:
        """A file outside the private root is Gradio's to judge; inside it, only its browser's."""
        if "://" in named:  # a URL: Gradio's own rules for those
            return True
        place = Path(os.path.realpath(named))
        try:
            parts = place.relative_to(self.root).parts
        except ValueError:
            return True
        if not parts or parts[0].startswith("."):
            return False
        if parts[0] not in (SESSIONS, UPLOADS):  # Gradio's own cache: its rules
            return True
        if len(parts) < 3:
            return False
        known, owner = self.owner(parts[0], parts[1])
        return known and same_browser(owner, browser)


def _cookies(scope) -> dict[str, str]:
    """The request's cookies, as Starlette reads them for a route (lenient: a malformed pair is skipped)."""
    return cookie_parser(b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1"))


def _with_cookie(send):
    """`send` that gives a page (an HTML response) a fresh browser cookie."""

    async def sending(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if kind.startswith(b"text/html"):
                cookie = f"{COOKIE}={secrets.token_urlsafe(32)}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*headers, (b"set-cookie", cookie.encode())]}
        await send(message)

    return sending
