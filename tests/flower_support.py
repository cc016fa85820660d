"""Shared by the Flower test modules: the acceptance federation and its in-process reference.

Imported as ``from flower_support import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil

from prelort.config import Config
from prelort.federation import run_simulation
from prelort.federation.core import ServerState
from prelort.flower import local
from prelort.processes import pid_alive
from prelort.workloads import build_workload

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "configs" / "synthetic.toml"
# The acceptance federation: 3 clients of ranks 2, 4, 8, all sampled, 2 rounds, tiny model.
SMALL_SET = [
    "run.rounds=2",
    "run.clients_per_round=3",
    "run.eval_every=1",
    "clients.levels=[2, 4, 8]",
    "synthetic.hidden=12",
    "synthetic.test_examples=60",
    "train.steps=2",
]


def small_config(method: str = "prelort", rounds: int = 2) -> Config:
    """The acceptance federation of ``method`` over ``rounds`` rounds, resolved as Flower does."""
    return local.resolve_config(
        str(SYNTHETIC), [*SMALL_SET, f"run.method='{method}'", f"run.rounds={rounds}"], 3, [2, 4, 8]
    )


def reference_run(cfg: Config) -> tuple[dict[str, Any], ServerState]:
    """``run_simulation`` on ``cfg``: its results and final server state."""
    states: list[ServerState] = []
    res = run_simulation(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
    return res, states[-1]


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def all_dead(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait up to ``timeout`` s for every process of ``pids`` to end; return those still alive."""
    end = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < end:
        time.sleep(0.2)
    return alive
