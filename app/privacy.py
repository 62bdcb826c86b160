"""Where a consultation may live on disk: one private directory per server process.

Gradio stores uploads under GRADIO_TEMP_DIR; we point it, and Python's tempfile, at a fresh
mode-0700 directory, keep each session's derived files (clean photos, reports) in its own
sub-directory, and remove everything on "new patient", on session end and at shutdown.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

_ROOT: Path | None = None


def private_root() -> Path:
    """Create (once per process) the private directory and route Gradio's and tempfile's files there.
    Must run before the Gradio app is created."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="skingpt-private-"))
        os.chmod(_ROOT, 0o700)
        os.environ["GRADIO_TEMP_DIR"] = str(_ROOT)
        tempfile.tempdir = str(_ROOT)  # multipart uploads spool here too, not in the shared /tmp
        atexit.register(wipe_root)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)
            signal.signal(sig, _wipe_then(previous))
    return _ROOT


def wipe_root() -> None:
    if _ROOT is not None and _ROOT.exists():
        shutil.rmtree(_ROOT, ignore_errors=True)


def _wipe_then(previous):
    def handler(signum, frame):
        wipe_root()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)
    return handler


def session_dir(root: Path, session: str) -> Path:
    path = root / "sessions" / session
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def remove_upload(path: Path, root: Path) -> None:
    """Delete an uploaded original (it may carry GPS tags) and its now-empty folder, inside root only."""
    path = path.resolve()
    if root.resolve() not in path.parents:
        return
    path.unlink(missing_ok=True)
    parent = path.parent
    if parent != root.resolve():
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            pass  # other uploads still in it, or another request removed it first
