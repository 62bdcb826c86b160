"""What may reach the app at all, checked before any route runs (one ASGI layer around everything).

- **Host allowlist.** A page on another site can point its own domain name at 127.0.0.1 (DNS
  rebinding) and then talk to the server as a same-origin page. Its requests carry that domain as
  `Host`, so only names the server was started with are answered: loopback names, the configured
  host, `--allowed-hosts` (a reverse proxy's name), and, when listening beyond loopback, IP
  addresses and this machine's own name (an IP address cannot be rebound).
- **Same-origin state changes.** A POST (or any method that changes state) that carries an
  `Origin` must come from a page of this server, or of a configured CORS origin. Requests without
  one (curl, the Python clients) are not browsers' cross-site requests and pass.
- **JSON for the API.** A cross-site form can send `text/plain` without a preflight; the API
  takes `application/json` only, so a page elsewhere cannot post to it.
- **Bodies bounded while they are read**, per route, so no oversized body is held or parsed.
- **No CORS** unless configured: the parent app's CORS layer (empty by default) replaces Gradio's,
  which would let any page on localhost read answers.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from app.errors import refusal

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Limits:
    """Largest body, in bytes, by path prefix (the longest matching prefix wins)."""

    default: int
    by_prefix: dict[str, int] = field(default_factory=dict)

    def of(self, path: str) -> int:
        best = max((p for p in self.by_prefix if path.startswith(p)), key=len, default=None)
        return self.default if best is None else self.by_prefix[best]


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]  # lower-case host names, without port
    any_ip: bool = False  # listening beyond loopback: any IP literal is a direct visit, never a rebinding
    anything: bool = False  # "*": a proxy in front checks names itself

    @classmethod
    def for_server(cls, host: str, extra: list[str], loopback: bool) -> HostPolicy:
        names = set(LOOPBACK_NAMES) | {n for n in extra if n != "*"}
        if host not in ("0.0.0.0", "::"):
            names.add(host.lower().strip("[]"))
        if not loopback:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return cls(frozenset(names), any_ip=not loopback, anything="*" in extra)

    def allows(self, header: str | None) -> bool:
        if self.anything:
            return True
        name = host_name(header)
        if name is None:
            return False
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip or address.is_loopback


def host_name(header: str | None) -> str | None:
    """The name in a Host header, lower case, without port or IPv6 brackets; None when malformed."""
    if not header:
        return None
    try:
        parts = urlsplit("//" + header.strip())
        name, _ = parts.hostname, parts.port  # .port raises on a malformed port
    except ValueError:
        return None
    return name.lower() if name else None


class Guard:
    """An ASGI app around the real one: refuses what must not reach it, bounds what may."""

    def __init__(self, app, hosts: HostPolicy, limits: Limits, origins: list[str] = (),
                 json_only: tuple[str, ...] = ()) -> None:
        self.app, self.hosts, self.limits = app, hosts, limits
        self.origins = frozenset(o.lower() for o in origins)
        self.json_only = json_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        api = path.startswith(self.json_only)
        host = headers.get("host")
        if not self.hosts.allows(host):
            return await _refuse(send, scope, 403, api, "forbidden_host",
                                 "this server does not answer to that host name; if it is yours (a reverse proxy's), "
                                 "start the server with --allowed-hosts NAME (or SKINGPT_ALLOWED_HOSTS)")
        origin = headers.get("origin")
        changes = scope["type"] == "websocket" or method not in SAFE_METHODS
        if changes and origin is not None and not self._same_site(origin, host):
            return await _refuse(send, scope, 403, api, "forbidden_origin",
                                 "requests from pages of other sites are refused; to let a site call this server, "
                                 "start it with --cors-origins ORIGIN (or SKINGPT_CORS_ORIGINS)")
        if api and method == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return await _refuse(send, scope, 415, api, "unsupported_media_type",
                                     "send the request body as JSON with Content-Type: application/json")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        limit = self.limits.of(path)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(send, scope, api, limit)
        await self._bounded(scope, receive, send, limit, api)

    def _same_site(self, origin: str, host: str | None) -> bool:
        """The page's origin is this server as the browser reached it (any scheme: a TLS proxy), or a
        configured CORS origin."""
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        return bool(parts.netloc) and host is not None and parts.netloc == host.strip().lower()

    async def _bounded(self, scope, receive, send, limit: int, api: bool) -> None:
        """Run the app, counting the body as it arrives: past `limit` the app is told the client left,
        whatever it sends is dropped, and the client gets 413."""
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(send, scope, api, limit)


async def _too_large(send, scope, api: bool, limit: int) -> None:
    await _refuse(send, scope, 413, api, "request_too_large", f"the request is over {limit / 2**20:.0f} MB")


async def _refuse(send, scope, status: int, api: bool, code: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body, kind = refusal(message, code, api)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
