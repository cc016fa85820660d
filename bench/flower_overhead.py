"""Per-round cost of PreLort on Flower's two engines vs the in-process simulator, and Flower's floor.

    .venv/bin/python bench/flower_overhead.py            # writes bench/results/flower_overhead.json

One config (synthetic workload, 3 clients of ranks 2, 4, 8, all sampled every round,
evaluation every round, ``--rounds`` rounds) runs

- ``simulator``: ``run_simulation`` in this process;
- ``simulation_engine``: ``run_local(engine="simulation")``: a ``--simulation`` SuperLink,
  ``flwr-simulation`` with the ServerApp and one Ray ClientApp worker that keeps the model
  loaded across messages;
- ``deployment``: ``run_local()``: a loopback deployment of real processes (one SuperLink, one
  SuperNode per client); Flower 1.42 starts a fresh ClientApp process for every message,
  which hands its work to the node's warm worker (``prelort.flower.worker``: one process per
  SuperNode that keeps the workload and model loaded; ``--no-workers``: every ClientApp
  process imports torch and builds the model itself, as before the workers);

and Flower's own floor on the same machine: the no-op app of ``bench/flower_noop`` (the
ClientApp replies at once with the arrays it received, the ServerApp sends each node a
message of the size PreLort sends it and pulls replies at PreLort's interval), on both
engines, with the same nodes and rounds.

Per round = the mean of the server's round times (``results.json`` ``rounds[t].seconds``:
sending, client work, aggregation and evaluation) over rounds 2..R; round 1 also pays the
workers' start-up (imports, model build) and is reported apart, as is the start-up outside
the rounds (processes, ``flwr run``, Ray, the QUERY round, round-0 evaluation, shutdown)
= total wall - sum of round times. CPU seconds are those of every process of a run
(sampled from /proc). Targets (issue #10): simulation engine <= 0.2 s per round over the
simulator after the first round; deployment <= 1.5 x the no-op deployment's round. All
processes use the same number of torch threads as the simulator. Both engines must end
with the simulator's global adapter (max abs difference reported).
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
NOOP_APP = ROOT / "bench" / "flower_noop"
SIM_TARGET_S = 0.2
DEPLOY_TARGET_X = 1.5


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
            st = stats.get(pid)
            if st is not None:
                self._known.add(pid)
                self.cpu[(pid, int(st[19]))] = (int(st[11]) + int(st[12])) / self._tick

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


def _rounds_summary(seconds: list[float], wall: float, cpu: float) -> dict[str, Any]:
    """Per-round figures from the server's round times (rounds 1..R) and the run's totals."""
    return {
        "round_s": statistics.mean(seconds[1:]),
        "round_s_median": statistics.median(seconds[1:]),
        "first_round_s": seconds[0],
        "round_seconds": seconds,
        "startup_s": wall - sum(seconds),
        "wall_s": wall,
        "cpu_s": cpu,
    }


def _prelort(cfg: Any, engine: str, node_workers: bool = True) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """One PreLort run on a Flower engine: (summary, results, global adapter)."""
    from prelort.federation.artifacts import load_global
    from prelort.flower.local import run_local

    with tempfile.TemporaryDirectory(prefix=f"prelort-{engine}-bench-") as tmp, DescendantCPU() as cpu:
        t0 = time.perf_counter()
        results = run_local(cfg, tmp, engine=engine, workers=1, timeout=3600, node_workers=node_workers)
        wall = time.perf_counter() - t0
        adapter, _ = load_global(tmp)
    summary = _rounds_summary([r["seconds"] for r in results["rounds"][1:]], wall, cpu.total)
    summary["workers"] = results["engine"]["workers"]
    return summary, results, adapter


def _noop(engine: str, nodes: int, rounds: int, sizes: list[int]) -> dict[str, Any]:
    """The no-op app on ``engine`` with ``nodes`` nodes: Flower's own round."""
    from prelort.flower.local import LocalFederation

    with tempfile.TemporaryDirectory(prefix=f"prelort-noop-{engine}-") as tmp, DescendantCPU() as cpu:
        out = Path(tmp) / "noop.json"
        t0 = time.perf_counter()
        with LocalFederation(Path(tmp) / "flower", [8] * nodes, engine=engine, workers=1) as fed:
            run_config: dict[str, str | int | float] = {
                "out": str(out),
                "rounds": rounds,
                "nodes": nodes,
                "sizes": ",".join(map(str, sizes)),
                "poll-interval": 0.02 if engine == "simulation" else 0.2,
            }
            fed.run(run_config, timeout=1800, app_dir=NOOP_APP)
        wall = time.perf_counter() - t0
        seconds = json.loads(out.read_text())["round_seconds"]
    return _rounds_summary(seconds, wall, cpu.total)


def _max_diff(adapter: Any, reference: Any) -> float:
    return max(
        max(float((p.A - reference[n].A).abs().max()), float((p.B - reference[n].B).abs().max()))
        for n, p in adapter.items()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ranks", default="2,4,8", help="one client (node) per rank")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--skip", default="", help="comma-separated parts to skip: simulation,deployment,noop (quick checks)"
    )
    p.add_argument("--no-workers", action="store_true", help="deployment without the warm per-node workers")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flower_overhead.json"))
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3 (round 1 is reported apart)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import flwr
    import torch

    from prelort.adapters.state import adapter_num_bytes
    from prelort.federation.core import ServerState
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import run_simulation
    from prelort.flower.local import resolve_config
    from prelort.workloads import build_workload

    ranks = [int(r) for r in args.ranks.split(",")]
    base = [*args.set, f"run.clients_per_round={len(ranks)}", "run.eval_every=1", f"run.rounds={args.rounds}"]
    cfg = resolve_config(args.config, base, len(ranks), ranks)
    load_before = os.getloadavg()

    # One torch thread count for everything: each of the N ClientApps of a deployment gets
    # cores // N (prelort.flower.local); the simulator and the simulation engine get the same.
    threads = max(1, (os.cpu_count() or 1) // len(ranks))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    states: list[ServerState] = []
    cpu0, t0 = _cpu_self(), time.perf_counter()
    sim = run_simulation(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
    sim_wall, sim_cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    simulator = _rounds_summary([r["seconds"] for r in sim["rounds"][1:]], sim_wall, sim_cpu)
    simulator.pop("startup_s")
    reference = states[-1].adapter

    # the no-op app sends each node as many floats as PreLort's round-1 downlink to that client
    plan = build_plan(cfg)
    rule = plan.make_rule()
    sizes = [adapter_num_bytes(rule.downlink(states[0].adapter, r)) // 4 for r in plan.ranks]

    report: dict[str, Any] = {
        "what": "PreLort per round on Flower's simulation engine and deployment vs the in-process "
        "simulator, and Flower's floor (no-op ClientApp), same machine and config",
        "command": "python bench/flower_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "torch_threads_per_process": threads,
        },
        "setup": {
            "method": cfg.run.method,
            "workload": cfg.workload.kind,
            "nodes": len(ranks),
            "ranks": ranks,
            "rounds": cfg.run.rounds,
            "clients_per_round": cfg.run.clients_per_round,
            "local_steps": cfg.train.steps,
            "eval_every": cfg.run.eval_every,
            "floats_per_message": sizes,
            "synthetic": {
                "d_in": cfg.synthetic.d_in,
                "hidden": cfg.synthetic.hidden,
                "d_out": cfg.synthetic.d_out,
            },
        },
        "simulator": simulator,
    }
    lines = [f"simulator {simulator['round_s']:.3f} s/round"]
    if "simulation" not in skip:
        eng, res, adapter = _prelort(cfg, "simulation")
        eng["overhead_per_round_s"] = eng["round_s"] - simulator["round_s"]
        eng["target_overhead_per_round_s"] = SIM_TARGET_S
        eng["meets_target"] = eng["overhead_per_round_s"] <= SIM_TARGET_S
        eng["same_global_adapter_max_abs_diff"] = _max_diff(adapter, reference)
        report["simulation_engine"] = eng
        lines.append(
            f"simulation engine {eng['round_s']:.3f} s/round (+{eng['overhead_per_round_s']:.3f} s, "
            f"first round {eng['first_round_s']:.1f} s, start-up {eng['startup_s']:.1f} s, "
            f"adapter diff {eng['same_global_adapter_max_abs_diff']:.2g})"
        )
    if "noop" not in skip:
        report["noop_simulation_engine"] = _noop("simulation", len(ranks), args.rounds, sizes)
        report["noop_deployment"] = _noop("deployment", len(ranks), args.rounds, sizes)
        lines.append(
            f"no-op floor: simulation engine {report['noop_simulation_engine']['round_s']:.3f} s/round, "
            f"deployment {report['noop_deployment']['round_s']:.2f} s/round"
        )
    if "deployment" not in skip:
        dep, res, adapter = _prelort(cfg, "deployment", node_workers=not args.no_workers)
        dep["node_workers"] = not args.no_workers
        dep["overhead_per_round_s"] = dep["round_s"] - simulator["round_s"]
        dep["same_global_adapter_max_abs_diff"] = _max_diff(adapter, reference)
        if "noop_deployment" in report:
            floor = report["noop_deployment"]["round_s"]
            dep["x_noop_floor"] = dep["round_s"] / floor
            dep["target_x_noop_floor"] = DEPLOY_TARGET_X
            dep["meets_target"] = dep["x_noop_floor"] <= DEPLOY_TARGET_X
        report["deployment"] = dep
        lines.append(
            f"deployment {dep['round_s']:.2f} s/round (+{dep['overhead_per_round_s']:.2f} s"
            + (f", {dep['x_noop_floor']:.2f} x the no-op floor" if "x_noop_floor" in dep else "")
            + f", start-up {dep['startup_s']:.1f} s"
            + f", adapter diff {dep['same_global_adapter_max_abs_diff']:.2g})"
        )
        report["final_per_rank"] = {
            "simulator": sim["final"]["per_rank"],
            "deployment": res["final"]["per_rank"],
        }
    report["machine"]["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("; ".join(lines) + f"; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
