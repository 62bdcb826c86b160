"""Photos uploaded from the page: each in a folder of its own, cleaned within the request that brought it.

Gradio names an upload's folder by the file's content hash, so the same photo sent from two tabs
(or twice in one message) shares one path, and whichever consultation uses or clears it first
deletes it for the other. Our upload route (Gradio's own, with its login check, over a fresh
folder per request) gives every upload its own path. Before the request returns, the photo is
taken in (`model.images.intake`: decoded upright in sRGB, its quality measured) and written back
from its pixels alone as a lossless PNG named by the server (never by the file's own name, which
may be the patient's); the original, with whatever GPS tags it carried, is deleted. The pixels stay
on disk, not in memory, until the photo is sent. A file that is not a usable photo leaves an empty
file and its reason, told in the chat when it is sent.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request  # at module level: FastAPI reads the route's annotations by name

from model.images.decode import ImageError
from model.images.intake import GONE, Intake, Kept, keep_lossless, reopen, take_photo
from model.images.quality import PhotoQuality

from app.errors import sentence
from app.web.files import browser_of
from app.privacy import UPLOADS, remove_upload


@dataclass(frozen=True)
class _Entry:
    kept: Kept | ImageError  # what was taken in (its pixels on disk, not in memory), or why it is not a photo
    made: float
    browser: str | None  # the browser that sent it: its file is served to that browser alone (app.web.files)


class Uploads:
    """What each cleaned upload was, by its path, until it is sent, cleared or swept."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / UPLOADS
        self._items: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.on_forget: Callable[[str], None] = lambda path: None

    def discard_folder(self, folder: Path) -> None:
        """A refused upload request's folder and whatever it had received."""
        shutil.rmtree(folder, ignore_errors=True)

    def new_folder(self) -> Path:
        """A folder for one upload request, named by the server."""
        folder = self.folder / secrets.token_hex(16)
        folder.mkdir(mode=0o700, parents=True)
        return folder

    def owner(self, folder: str) -> tuple[bool, str | None]:
        """Whether an upload folder holds a cleaned upload not yet sent, and the browser that sent it."""
        with self._lock:
            return next(((True, e.browser) for p, e in self._items.items()  # an upload lies under its request's folder
                         if Path(p).is_relative_to(self.folder / folder)),
                        (False, None))

    def clean(self, path: Path, browser: str | None = None) -> str:
        """Replace an uploaded original by its pixels alone (or an empty file and the reason it is
        not a photo), as `browser`'s; the path to hand to the page."""
        path = Path(path)
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        try:
            taken: Intake | ImageError = take_photo(data, name="That file")
        except ImageError as err:
            taken = err
        clean = path.with_name(f"photo-{secrets.token_hex(6)}.png")  # named by us: no patient's name on disk
        if isinstance(taken, Intake):
            kept: Kept | ImageError = keep_lossless(taken, clean)
        else:  # an empty file: the page shows the attachment, the chat says why it is refused
            os.close(os.open(clean, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
            kept = taken
        with self._lock:
            self._items[str(clean)] = _Entry(kept, time.monotonic(), browser)
        return str(clean)

    def quality(self, path: str | Path) -> PhotoQuality | None:
        """How a cleaned upload measured on arrival (None: unknown, or not a photo)."""
        with self._lock:
            entry = self._items.get(str(path))
        return entry.kept.quality if entry is not None and isinstance(entry.kept, Kept) else None

    def known(self, path: str | Path) -> bool:
        with self._lock:
            return str(path) in self._items

    def take(self, path: str | Path) -> Intake:
        """The photo at a cleaned path (ImageError when it was not one); the file is deleted."""
        with self._lock:
            entry = self._items.pop(str(path), None)
        try:
            if entry is None:
                raise ImageError(GONE)
            if isinstance(entry.kept, ImageError):
                raise entry.kept
            return reopen(entry.kept)
        finally:
            self._remove(path)

    def _remove(self, path: str | Path) -> None:
        remove_upload(Path(path), self.root)
        self.on_forget(str(path))

    def sweep(self, older_than_s: float) -> int:
        """Forget entries whose file is gone or older than `older_than_s`."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            old = [p for p, e in self._items.items() if e.made < cutoff or not os.path.exists(p)]
            for path in old:
                del self._items[path]
        for path in old:
            self._remove(path)
        return len(old)


def own_upload_route(app, blocks, uploads: Uploads, gradio_app: Callable[[], Any]) -> None:
    """Our upload route on the parent app, added before Gradio is mounted at / so that it answers
    first: Gradio's parser and login rule (`gradio_app()`: the mounted Gradio app), over a folder
    of its own per request, every file cleaned before it answers."""
    import anyio
    from fastapi.responses import PlainTextResponse
    from gradio.route_utils import MultiPartException, upload_fn
    from gradio.routes import file_upload_statuses

    def logged_in(request: Request) -> bool:  # as Gradio's own login check decides
        mounted = gradio_app()
        if mounted.auth is None and mounted.auth_dependency is None:
            return True
        token = (request.cookies.get(f"access-token-{mounted.cookie_id}")
                 or request.cookies.get(f"access-token-unsecure-{mounted.cookie_id}"))
        return mounted.tokens.get(token) is not None

    async def upload_file(request: Request, upload_id: str | None = None):
        if not logged_in(request):
            return PlainTextResponse(sentence("not logged in: open the page and log in again"), status_code=401)
        folder = uploads.new_folder()
        limit = blocks.max_file_size if blocks.max_file_size is not None else math.inf
        try:
            files, _, _ = await upload_fn(request, folder, limit, upload_id, force_move=True,
                                          upload_progress=file_upload_statuses if upload_id else None)
        except MultiPartException as exc:
            uploads.discard_folder(folder)
            status = 413 if "maximum allowed size" in exc.message else 400
            return PlainTextResponse(sentence(exc.message), status_code=status)
        # identical files in one request land on one path: cleaned once, named as often as sent
        browser = browser_of(request.cookies)
        cleaned = await anyio.to_thread.run_sync(
            lambda: {f: uploads.clean(Path(f), browser) for f in dict.fromkeys(files)})
        blocks.upload_file_set.update(cleaned.values())
        return [cleaned[f] for f in files]

    uploads.on_forget = blocks.upload_file_set.discard  # Gradio's own set would otherwise only grow
    app.add_api_route("/gradio_api/upload", upload_file, methods=["POST"], include_in_schema=False)
