"""Where a supervised engine listens: a free loopback port, or a private Unix-socket directory, and the cleanup
of directories a killed serve left behind."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

SOCKDIR_PREFIX = "hybridinfer-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_sockdir() -> tuple[str, str]:
    """A fresh private directory (0700) for the engine's socket -> (directory, socket path). Stale ones go first."""
    clean_stale_sockdirs()
    d = tempfile.mkdtemp(prefix=SOCKDIR_PREFIX)
    with open(os.path.join(d, "owner.pid"), "w") as f:
        f.write(str(os.getpid()))  # lets a later serve remove this directory if we are killed
    return d, os.path.join(d, "engine.sock")


def clean_stale_sockdirs(tmp: str | None = None) -> list[str]:
    """Remove private socket directories left by a serve that was killed (-9): ours, owned by us, whose owner
    process is gone. Returns what was removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for n in names:
        d = os.path.join(tmp, n)
        if n.startswith(SOCKDIR_PREFIX) and _stale(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _stale(d: str) -> bool:
    try:
        st = os.lstat(d)
        if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid():
            return False
        with open(os.path.join(d, "owner.pid")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        # No owner file: only a directory holding nothing but a dead socket is ours to remove.
        try:
            entries = os.listdir(d)
        except OSError:
            return False
        return entries == ["engine.sock"] and not _listening(os.path.join(d, "engine.sock"))
    return not (pid and _alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(path)
            return True
        except OSError:
            return False
