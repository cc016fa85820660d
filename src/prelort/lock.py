"""One run per output folder: ``OUT/.prelort.lock`` held while a command writes to OUT.

The lock file holds the owner's pid. On POSIX it is an ``fcntl.flock`` lock, which the
kernel releases when its process dies (even by SIGKILL), so a lock file left behind by a
dead process is *stale*: the next run takes it over with a logged line. Elsewhere the file
is created with O_CREAT | O_EXCL and a file naming a pid that no longer runs is stale.

A second ``prelort run`` / ``--resume`` / ``compare`` on a locked folder raises
``LockedError`` (one line, exit 2) instead of racing the first for the results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prelort.errors import UserError
from prelort.processes import pid_alive

LOCK_FILE = ".prelort.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockedError(UserError):
    """The output folder is in use by another live prelort process."""


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _write_pid(fd: int) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)


def _refuse(out: Path, pid: int | None) -> LockedError:
    who = f"prelort process {pid}" if pid else "another prelort process"
    return LockedError(
        f"{out}: in use by {who} ({out / LOCK_FILE}); wait for it to finish or choose another --out"
    )


def _acquire_flock(out: Path, path: Path, log: Callable[[str], Any] | None) -> int:
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise _refuse(out, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder we waited on may have removed the file: lock the one on disk
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        old = _read_pid(fd)
        if old is not None and old != os.getpid() and log is not None:
            log(f"taking over the stale lock {path} of process {old} (no longer running)")
        _write_pid(fd)
        return fd


def _acquire_excl(out: Path, path: Path, log: Callable[[str], Any] | None) -> int:  # pragma: no cover
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                text = path.read_text(encoding="ascii", errors="replace").strip()
            except FileNotFoundError:
                continue
            pid = int(text) if text.isdigit() else None
            if pid is not None and pid_alive(pid):
                raise _refuse(out, pid) from None
            if log is not None:
                log(f"taking over the stale lock {path} of process {pid} (no longer running)")
            path.unlink(missing_ok=True)
            continue
        _write_pid(fd)
        return fd
    raise _refuse(out, None)


@contextlib.contextmanager
def run_lock(out: str | Path, log: Callable[[str], Any] | None = None) -> Iterator[Path]:
    """Hold ``OUT/.prelort.lock`` for the duration of the block (OUT is created if needed).

    Raises LockedError if another live process holds it; a stale one is taken over and
    ``log`` is told. The lock file is removed on any exit from the block (and OUT too if
    this call created it and nothing was written into it).
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    try:
        fd = _acquire_flock(out, path, log) if fcntl is not None else _acquire_excl(out, path, log)
    except BaseException:
        _remove_if_empty(out, created)
        raise
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a waiter then sees another inode and retries
        os.close(fd)  # releases the flock
        _remove_if_empty(out, created)


def _remove_if_empty(out: Path, created: bool) -> None:
    """A folder made only to hold the lock of a command that wrote nothing leaves no trace."""
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()
