"""Flower deployment overhead per round vs the in-process simulator, on the same work.

    .venv/bin/python bench/flower_overhead.py            # writes bench/results/flower_overhead.json

Both paths run one config (synthetic workload, 3 clients of ranks 2, 4, 8, all sampled every
round, evaluation every round) and call the same ``client_update`` / ``server_update``:

- ``simulator``: ``run_simulation`` in this process;
- ``flower``: ``prelort.flower.local.run_local``, a loopback deployment of real processes
  (one SuperLink, one SuperNode per client, ``flwr run``), each ClientApp message in a fresh
  process as Flower runs it.

The Flower deployment runs twice, with ``--rounds`` and with 1 round, so the per-round cost
can be separated from the one-off start-up (processes, ``flwr run``, the QUERY round):
per-round = (cost(R) - cost(1)) / (R - 1), for wall time and for CPU seconds (the CPU time of
every process of the deployment, sampled from /proc). CPU seconds are less sensitive than
wall time to other jobs on a shared machine; the load average is recorded.
The script also checks that both paths end with the same global adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class DescendantCPU:
    """CPU seconds of every descendant process, sampled from /proc every ``interval`` s.

    Each process counts with its last sample (utime + stime), so a process loses at most
    ``interval`` s; orphans re-parented away from us are still counted once seen. Linux only.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._known: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        stats: dict[int, list[str]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    text = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                stats[int(entry.name)] = text.rsplit(")", 1)[1].split()
        roots = {os.getpid()} | self._known
        changed = True
        while changed:  # descendants of us, and of processes seen before (orphans keep counting)
            changed = False
            for pid, f in stats.items():
                if pid not in roots and int(f[1]) in roots:
                    roots.add(pid)
                    changed = True
        for pid in roots - {os.getpid()}:
            f = stats.get(pid)
            if f is not None:
                self._known.add(pid)
                self.cpu[(pid, int(f[19]))] = (int(f[11]) + int(f[12])) / self._tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> DescendantCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def _flower(cfg: Any, *, tls: bool) -> tuple[dict[str, Any], float, float, Any]:
    """One loopback Flower run: (results, wall s, CPU s of all its processes, global adapter)."""
    from prelort.federation.artifacts import load_global
    from prelort.flower.local import run_local

    with tempfile.TemporaryDirectory(prefix="prelort-flower-bench-") as tmp, DescendantCPU() as cpu:
        t0 = time.perf_counter()
        results = run_local(cfg, tmp, tls=tls, auth=tls, timeout=3600)
        wall = time.perf_counter() - t0
        adapter, _ = load_global(tmp)
    return results, wall, cpu.total, adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ranks", default="2,4,8", help="one SuperNode per rank")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flower_overhead.json"))
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")

    import flwr
    import torch

    from prelort.federation.core import ServerState
    from prelort.federation.simulator import run_simulation
    from prelort.flower.local import resolve_config
    from prelort.workloads import build_workload

    ranks = [int(r) for r in args.ranks.split(",")]
    base = [*args.set, f"run.clients_per_round={len(ranks)}", "run.eval_every=1"]
    cfg = resolve_config(args.config, [*base, f"run.rounds={args.rounds}"], len(ranks), ranks)
    cfg1 = resolve_config(args.config, [*base, "run.rounds=1"], len(ranks), ranks)
    load_before = os.getloadavg()

    # One torch thread, as each SuperNode of the loopback deployment gets on a small machine
    # (prelort.flower.local caps OMP_NUM_THREADS at cores // nodes); spinning OpenMP threads
    # on a busy machine would otherwise inflate the simulator's time many-fold.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(ranks)))
    states: list[ServerState] = []
    cpu0, t0 = _cpu_self(), time.perf_counter()
    sim = run_simulation(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
    sim_wall, sim_cpu = time.perf_counter() - t0, _cpu_self() - cpu0

    fl, fl_wall, fl_cpu, adapter = _flower(cfg, tls=args.tls)
    _, fl1_wall, fl1_cpu, _ = _flower(cfg1, tls=args.tls)
    diff = max(
        max(
            float((pair.A - states[-1].adapter[n].A).abs().max()),
            float((pair.B - states[-1].adapter[n].B).abs().max()),
        )
        for n, pair in adapter.items()
    )

    extra = args.rounds - 1
    sim_round = statistics.mean(r["seconds"] for r in sim["rounds"][1:])
    fl_round_server = statistics.mean(r["seconds"] for r in fl["rounds"][1:])
    fl_round_wall = (fl_wall - fl1_wall) / extra
    fl_round_cpu = (fl_cpu - fl1_cpu) / extra
    report = {
        "what": "Flower loopback deployment vs in-process simulator, same config and work",
        "command": "python bench/flower_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "simulator_torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        },
        "setup": {
            "method": cfg.run.method,
            "workload": cfg.workload.kind,
            "nodes": len(ranks),
            "ranks": ranks,
            "rounds": cfg.run.rounds,
            "clients_per_round": cfg.run.clients_per_round,
            "local_steps": cfg.train.steps,
            "tls_and_auth": args.tls,
            "synthetic": {
                "d_in": cfg.synthetic.d_in,
                "hidden": cfg.synthetic.hidden,
                "d_out": cfg.synthetic.d_out,
            },
        },
        "simulator": {
            "round_wall_s": sim_round,
            "round_cpu_s": sim_cpu / args.rounds,
            "wall_s": sim_wall,
            "cpu_s": sim_cpu,
        },
        "flower": {
            "round_wall_s": fl_round_wall,
            "round_wall_s_server_view": fl_round_server,
            "round_cpu_s": fl_round_cpu,
            "startup_wall_s": fl1_wall - fl_round_wall,
            "startup_cpu_s": fl1_cpu - fl_round_cpu,
            "wall_s": {f"{args.rounds}_rounds": fl_wall, "1_round": fl1_wall},
            "cpu_s": {f"{args.rounds}_rounds": fl_cpu, "1_round": fl1_cpu},
        },
        "overhead_per_round_wall_s": fl_round_wall - sim_round,
        "overhead_per_round_cpu_s": fl_round_cpu - sim_cpu / args.rounds,
        "same_global_adapter_max_abs_diff": diff,
        "final_per_rank": {"simulator": sim["final"]["per_rank"], "flower": fl["final"]["per_rank"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    startup = report["flower"]
    print(
        f"simulator {sim_round:.3f} s/round ({sim_cpu / args.rounds:.2f} CPU s); "
        f"Flower {fl_round_wall:.1f} s/round ({fl_round_cpu:.1f} CPU s), "
        f"start-up {startup['startup_wall_s']:.1f} s ({startup['startup_cpu_s']:.1f} CPU s); "
        f"adapter diff {diff:.2g}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
