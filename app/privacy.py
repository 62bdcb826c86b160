"""Where a consultation may live on disk: one private directory per server process.

Gradio stores uploads under GRADIO_TEMP_DIR; we point it, and Python's tempfile, at a fresh
mode-0700 directory, keep each session's derived files (clean photos, reports) in its own
sub-directory named by a server-drawn id, and remove everything on "new patient", on session end
and at shutdown. Photos attached but never sent are swept after a short time; a directory left
behind by a process that died without cleaning up (SIGKILL, power loss) is removed at the next start.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

PREFIX = "skingpt-private-"
OWNER_FILE = ".owner"  # "<pid> <process start time>": which process this directory belongs to
SESSIONS = "sessions"
UPLOADS = "uploads"  # each upload request's own folder (app.web.uploads)
_ID = re.compile(r"[0-9a-f]{32}")
_ROOT: Path | None = None


def private_root() -> Path:
    """Create (once per process) the private directory and route Gradio's and tempfile's files there.
    Must run before the Gradio app is created."""
    global _ROOT
    if _ROOT is None:
        os.umask(0o077)  # every file this process writes (Gradio's too) is its user's alone: 0600 / 0700
        base = Path(tempfile.gettempdir())
        remove_orphans(base)
        _ROOT = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        os.chmod(_ROOT, 0o700)
        owner = os.open(_ROOT / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(owner, "w") as handle:
            handle.write(_identity(os.getpid()) or str(os.getpid()))
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


def _identity(pid: int) -> str | None:
    """'pid start-time' of a live process (the start time tells a reused pid apart), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"  # field 22: start time in clock ticks
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)


def remove_orphans(base: Path) -> list[Path]:
    """Remove private directories under `base` that belong to this user and to a process of this app
    that is no longer running. Directories without an owner file, or of other users, are left alone."""
    removed = []
    for path in base.glob(PREFIX + "*"):
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
            owner = (path / OWNER_FILE).read_text().strip()
            pid = int(owner.split()[0])
        except (OSError, ValueError, IndexError):
            continue
        alive = _identity(pid)
        reused = alive is not None and " " in owner and " " in alive and alive != owner  # another process now
        if pid != os.getpid() and (alive is None or reused):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def session_dir(root: Path, session_id: str) -> Path:
    """A consultation's folder. Its name is a server-drawn id, checked here once more, so that no
    client-supplied string can ever become part of a path."""
    if not _ID.fullmatch(session_id):
        raise ValueError("a session folder is named by a server-drawn id")
    path = root / SESSIONS / session_id
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _is_upload(path: Path, root: Path) -> bool:
    """An uploaded original inside root (Gradio's upload folders), not a consultation's own files."""
    root = root.resolve()
    return root in path.parents and (root / SESSIONS) not in path.parents and path.name != OWNER_FILE


def remove_upload(path: Path, root: Path) -> None:
    """Delete an uploaded original (it may carry GPS tags) and its now-empty folder, inside root only."""
    path = Path(path).resolve()
    if not _is_upload(path, root):
        return
    path.unlink(missing_ok=True)
    root = root.resolve()
    for parent in path.parents:  # the folders it came in, up to (not including) the top ones
        if parent in (root, root / UPLOADS):
            break
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break  # other uploads still in it, or another request removed it first


def sweep_uploads(root: Path, older_than_s: float) -> int:
    """Delete uploaded originals that were never sent (attached, then the tab left) after a while."""
    cutoff = time.time() - older_than_s
    count = 0
    for folder, dirs, files in os.walk(root):  # unreadable or vanished folders are skipped
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d != SESSIONS]
        for name in files:
            path = Path(folder) / name
            try:
                if not path.is_symlink() and _is_upload(path.resolve(), root) and path.stat().st_mtime < cutoff:
                    remove_upload(path, root)
                    count += 1
            except OSError:
                continue  # removed meanwhile
    return count
