"""Atomic result files: write to a temp file, fsync, rename (a crash never leaves half a file).

The one atomic-write helper of the project: results, summaries, checkpoints and the global
adapter all go through ``atomic_write_bytes`` (temp names start with a dot, so a folder
listing never mistakes a leftover for a result). The files get the mode an ordinary
``open()`` would give (0o666 less the user's umask), not ``mkstemp``'s private 0o600.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so it is never changed there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temp file in the same folder, fsync, rename, fsync folder.

    ``path`` naming a folder raises IsADirectoryError with ``path`` as its file name.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0o600; the result gets the user's umask
            os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
