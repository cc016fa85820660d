"""Is a process alive? The one check that the run lock, the warm worker and the loopback
federation share (imports nothing from prelort, so any module can use it)."""

from __future__ import annotations

import psutil


def pid_alive(pid: int) -> bool:
    """``pid`` names a process that has not exited.

    A process owned by another user is alive (we may not signal it, but it runs); a zombie
    (exited, not yet reaped by its parent) is not; neither is a pid <= 0 or one out of range.
    """
    if pid <= 0:
        return False
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True
    return bool(status != psutil.STATUS_ZOMBIE)  # psutil has no type hints here
