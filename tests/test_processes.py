"""``prelort.processes.pid_alive`` and ``prelort.flower.process_tree``, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from prelort.flower.process_tree import descendants, processes_under, stop
from prelort.processes import pid_alive

SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed and reaped at its end whatever happened."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_running_process_is_alive_until_killed(spawned: list[subprocess.Popen[str]]) -> None:
    proc = subprocess.Popen(SLEEP)
    spawned.append(proc)
    assert pid_alive(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    assert not pid_alive(proc.pid)
    assert pid_alive(os.getpid())


def test_a_zombie_and_a_pid_that_does_not_exist_are_not_alive(spawned: list[subprocess.Popen[str]]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    spawned.append(proc)
    # it exits, and stays a zombie until we reap it (no wait yet)
    assert _wait(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
    assert not pid_alive(proc.pid)
    proc.wait(timeout=10)
    assert not pid_alive(proc.pid)
    pid_max = Path("/proc/sys/kernel/pid_max")
    beyond = int(pid_max.read_text()) + 1 if pid_max.exists() else 10**7
    for pid in (beyond, 2**31, 10**30, 0, -1):
        assert not pid_alive(pid), pid


def test_a_process_of_another_user_is_alive() -> None:
    """Signalling it is not allowed (PermissionError), yet it exists: alive."""
    if os.geteuid() != 0:
        uids = {p.pid: p.info["uids"] for p in psutil.process_iter(["uids"])}
        other = next((pid for pid, u in uids.items() if u is not None and u.real != os.getuid()), None)
        if other is None:
            pytest.skip("no process of another user to look at")
        with pytest.raises(PermissionError):
            os.kill(other, 0)
        assert pid_alive(other)
        return
    # root may signal anything: a forked child drops to `nobody` and looks at this (root's) process
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 4
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                os.kill(parent, 0)
                code = 2  # allowed after all: not another user's process
            except PermissionError:
                code = 0 if pid_alive(parent) else 1
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        pytest.skip("cannot switch to another user here")
    assert code == 0, {1: "pid_alive says another user's process is dead", 2: "kill was allowed"}.get(code)


def test_descendants_processes_under_and_stop(tmp_path: Path, spawned: list[subprocess.Popen[str]]) -> None:
    work = tmp_path / "fed"
    env = {**os.environ, "FLWR_HOME": str(work / "home" / "node")}
    # a parent whose child inherits FLWR_HOME; the child ignores SIGTERM, so stop must SIGKILL it
    grandchild = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(30)"
    )
    code = (
        "import subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE, text=True)\n"
        "c.stdout.readline()\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    spawned.append(parent)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    # a neighbour whose FLWR_HOME only shares a prefix of the name: not under `work`
    other = subprocess.Popen(SLEEP, env={**os.environ, "FLWR_HOME": f"{work}-other/home"})
    spawned.append(other)
    assert _wait(lambda: other.pid in processes_under(Path(f"{work}-other")))

    assert descendants(parent.pid) == [child]
    assert descendants(child) == []
    assert sorted(processes_under(work)) == sorted([parent.pid, child])
    start = time.monotonic()
    assert stop([parent.pid, child], timeout=1) == []
    assert time.monotonic() - start < 8
    assert not pid_alive(parent.pid) and not pid_alive(child)
    assert parent.wait(timeout=10) == -signal.SIGTERM
    assert processes_under(work) == [] and descendants(parent.pid) == []
    assert pid_alive(other.pid)  # untouched
    assert stop([other.pid, 10**7]) == [] and other.wait(timeout=10) == -signal.SIGTERM  # 10**7: no such pid
