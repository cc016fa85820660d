"""Finding and stopping the processes of a loopback federation (``psutil``).

``prelort.flower.launch.LocalFederation`` starts the SuperLink, SuperNodes, workers and the
``flwr`` CLI; they spawn more (SuperExec, ClientApp, ``flwr-simulation`` and Ray processes),
some in sessions of their own, some orphaned when their parent dies. ``close`` finds them by
parent (``descendants``) and by the ``FLWR_HOME`` each inherits (``processes_under``) and
stops them (``stop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from prelort.processes import pid_alive


def descendants(pid: int) -> list[int]:
    """Every live descendant pid of ``pid`` (children, grandchildren, ...); [] if it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def processes_under(workdir: Path) -> list[int]:
    """Live processes (other than this one) whose ``FLWR_HOME`` lies under ``workdir``.

    Every process a ``LocalFederation`` starts gets such an ``FLWR_HOME`` and passes it on to
    what it spawns, so this finds them even after their parent died (e.g. the SuperExec of a
    SuperNode the SuperLink refused). Processes whose environment we may not read are not
    ours and are skipped.
    """
    prefix = f"{Path(workdir).absolute()}{os.sep}"
    found: list[int] = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            home = proc.environ().get("FLWR_HOME", "")
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
        if home.startswith(prefix) and pid_alive(proc.pid):
            found.append(proc.pid)
    return found


def stop(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM every live process of ``pids``, SIGKILL those still alive ``timeout`` s later;
    return the pids still alive after that (normally none)."""
    procs: list[psutil.Process] = []
    for pid in set(pids):
        with contextlib.suppress(psutil.Error):  # gone already
            procs.append(psutil.Process(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # gone, or its pid reused since (psutil checks)
                proc.send_signal(sig)
        end = time.monotonic() + timeout
        while (procs := [p for p in procs if pid_alive(p.pid)]) and time.monotonic() < end:
            time.sleep(0.1)
        if not procs:
            break
    return [p.pid for p in procs]


def flwr_home(env: dict[str, str] | None = None) -> Path:
    """The ``FLWR_HOME`` of ``env`` (default: this process's), else Flower's ``~/.flwr``."""
    value = (os.environ if env is None else env).get("FLWR_HOME", "")
    return Path(value).expanduser().absolute() if value else Path.home() / ".flwr"


def local_superlinks(home: Path | None = None) -> list[int]:
    """The local SuperLinks that ``flwr run`` started for ``home`` (default: ``flwr_home()``).

    ``flwr run`` with Flower's default ``local`` connection (``address = ":local:"``) starts a
    detached ``flower-superlink --simulation`` and leaves it running for the next run; it is
    recognised by its command line and by the ``FLWR_HOME`` it inherited.
    """
    want = (home or flwr_home()).absolute()
    found: list[int] = []
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if "flower-superlink" in cmd and "--simulation" in cmd and flwr_home(env) == want:
            found.append(proc.pid)
    return found


def stop_local_superlinks(home: Path | None = None, timeout: float = 10.0) -> list[int]:
    """Stop ``local_superlinks(home)`` and their descendants (SuperExec, ...); return the pids
    still alive afterwards (normally none)."""
    pids = local_superlinks(home)
    return stop([p for pid in pids for p in (pid, *descendants(pid))], timeout)


if __name__ == "__main__":  # python -m prelort.flower.process_tree: stop the local SuperLink
    stopped = local_superlinks()
    left = stop_local_superlinks()
    alive = f"; still alive: {left}" if left else ""
    print(f"stopped {len(stopped)} local SuperLink(s) of {flwr_home()}{alive}")
    raise SystemExit(1 if left else 0)
