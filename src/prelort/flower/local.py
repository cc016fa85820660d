"""A loopback Flower federation in one call: a SuperLink, N (virtual) SuperNodes, ``flwr run``.

    python -m prelort.flower.local --nodes 3 --ranks 2,4,8 \\
        --config configs/synthetic.toml --set run.rounds=5 --out runs/flower [--tls | --auth] \\
        [--no-workers]
    python -m prelort.flower.local --engine simulation \\
        --config configs/synthetic.toml --out runs/flower-sim [--workers 2]

**Deployment engine** (the default, ``--engine deployment``)

starts real processes on 127.0.0.1 (free ports):

- ``flower-superlink --host 127.0.0.1 --port P --disable-runtime-dependency-installation``
  (``--insecure``, or TLS with a test CA from ``certs``; ``--enable-supernode-auth``);
- with ``--auth``: ``flwr supernode register node-<i>.pub`` for every node key;
- per client, a warm worker ``python -m prelort.flower.worker --address unix:S_i
  --parent-pid <this process>`` (``prelort.flower.worker``: keeps the workload and model
  loaded; ``S_i`` in a fresh short temp folder, removed at the end; ``--no-workers``: none);
- ``flower-supernode --superlink 127.0.0.1:P --port Q_i --node-config "partition-id=i rank=r_i
  worker='unix:S_i'"`` per client (plus ``--root-certificates`` /
  ``--auth-supernode-private-key``): its ClientApp processes, one per message, hand their
  work to the node's worker;
- ``flwr run <prelort/flower/app> prelort-local --run-config <file> --stream``, where the run
  config names the fully resolved PreLort config written to ``OUT/flower/prelort.toml``;

**Simulation engine** (``--engine simulation``, needs ``flwr[simulation]``, i.e. Ray)

- ``flower-superlink --simulation --host 127.0.0.1 --port P --insecure
  --disable-runtime-dependency-installation``: no SuperNode processes; the SuperLink's
  SuperExec starts ``flwr-simulation``, which runs the ServerApp and a Ray pool of
  ClientApp workers (actors) for ``clients.num_clients`` virtual SuperNodes;
- ``flwr run ... --federation-config "num-supernodes=N init-args-num-cpus=W
  client-resources-num-cpus=1"``: W workers (``--workers``), each keeps its ClientApp module,
  and so the built workload and base model (``client_app._WORKERS``), across messages.
  Virtual SuperNode i has ``partition-id`` i and no rank: the ranks come from the run's
  config (``clients.ranks``, or drawn from ``clients.rank_distribution``). Ray keeps its
  session files in a fresh ``RAY_TMPDIR`` under the system's temp folder (Unix socket paths
  must stay short), removed at the end.

Either way it then waits for the run, prints the per-rank table from ``OUT/results.json``
(written by the ServerApp, the same file as ``prelort run``) and stops every process it
started, their SuperExec, app, worker and Ray processes included. Logs stay in ``OUT/flower/logs``.
Every process gets its own ``FLWR_HOME`` under ``OUT/flower/home``, so ``~/.flwr`` is not
touched. Bad input is one ``prelort: error: ...`` line on stderr and exit status 2, as for
``prelort``; a federation or run that fails is such a line with status 1.

The processes are started by ``prelort.flower.launch.LocalFederation`` and found and stopped
by ``prelort.flower.process_tree``; this module re-exports both modules' public names.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prelort.config import Config, config_to_dict, dump_toml, load_config
from prelort.errors import UsageParser as _Parser
from prelort.errors import UserError
from prelort.errors import fail as _fail
from prelort.errors import os_error_line as _os_error_line
from prelort.flower.launch import CONNECTION, ENGINES, LocalFederation, Started, free_ports
from prelort.flower.process_tree import descendants, processes_under

__all__ = [
    "CONNECTION",
    "ENGINES",
    "LocalFederation",
    "Started",
    "descendants",
    "free_ports",
    "main",
    "processes_under",
    "resolve_config",
    "run_local",
]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


# -- the command line -----------------------------------------------------------------------------
def resolve_config(
    config: str | None,
    overrides: Sequence[str],
    nodes: int | None,
    ranks: Sequence[int] | None,
    notes: list[str] | None = None,
) -> Config:
    """The run's validated Config for ``nodes`` SuperNodes, one client each.

    Sets ``clients.num_clients = nodes`` (None: the config's ``clients.num_clients``) and, if
    given, ``clients.ranks = ranks``; a config that samples more clients per round than there
    are nodes samples all of them (a line saying so is appended to ``notes``).
    ConfigError/UserError with one line otherwise.
    """
    requested = load_config(config, overrides)
    given = f"--nodes {nodes}"
    if nodes is None:
        nodes = requested.clients.num_clients
        given = f"clients.num_clients = {nodes}"
    if ranks is not None and len(ranks) != nodes:
        raise UserError(f"--ranks has {len(ranks)} entries for {given}; give one rank per node")
    extra = [f"clients.num_clients={nodes}"]
    if ranks is not None:
        extra.append(f"clients.ranks=[{', '.join(map(str, ranks))}]")
    if requested.run.clients_per_round > nodes:
        extra.append(f"run.clients_per_round={nodes}")
        if notes is not None:
            notes.append(
                f"note: run.clients_per_round = {requested.run.clients_per_round} > {nodes} nodes; "
                f"sampling all {nodes} every round"
            )
    return load_config(config, [*overrides, *extra])


def run_local(
    cfg: Config,
    out: str | Path,
    *,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 3600,
    engine: str = "deployment",
    workers: int = 1,
    node_workers: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` on a loopback federation (one node per client); return ``results.json``.

    ``engine="simulation"`` runs it on Flower's simulation engine with ``workers`` Ray
    ClientApp workers instead of SuperNode processes. On the deployment engine every
    SuperNode gets a warm worker unless ``node_workers`` is False.
    """
    from prelort.federation.plan import assign_ranks

    out = Path(out).absolute()
    work = out / "flower"
    fed = LocalFederation(
        work,
        assign_ranks(cfg),
        tls=tls,
        auth=auth,
        engine=engine,
        workers=workers,
        node_workers=node_workers,
    )
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "prelort.toml"
    conf.write_text(dump_toml(config_to_dict(cfg)), encoding="utf-8")
    run_config: dict[str, str | int | float] = {"config": str(conf), "out": str(out)}
    if fed.simulation:  # the simulation engine's grid is in memory: pulling often costs nothing
        run_config["poll-interval"] = 0.02
    with fed:
        fed.run(run_config, timeout=timeout)
    results: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return results


def _parser() -> argparse.ArgumentParser:
    p = _Parser(  # a usage error is a UserError: one line, status 2, like `prelort`
        prog="python -m prelort.flower.local",
        description="Run a PreLort config on a loopback Flower federation: a deployment (SuperLink + "
        "N SuperNode processes) or Flower's simulation engine (N virtual SuperNodes on Ray).",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="deployment",
        help="deployment: SuperNode processes; simulation: Flower's simulation engine "
        "(needs flwr[simulation])",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="number of SuperNodes = clients.num_clients (default: the config's)",
    )
    p.add_argument("--ranks", default="", help="rank per node, e.g. 2,4,8 (default: from the config)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="simulation engine: ClientApp workers (Ray actors), each holding one model copy (default 1)",
    )
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="deployment: no warm worker per SuperNode (every ClientApp process imports torch and "
        "builds the model itself)",
    )
    p.add_argument("--config", default=None, help="PreLort TOML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="results folder (results.json, logs in OUT/flower/logs)")
    p.add_argument(
        "--tls", action="store_true", help="deployment: TLS between SuperNodes and SuperLink (test CA)"
    )
    p.add_argument("--auth", action="store_true", help="deployment: SuperNode authentication (implies --tls)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prelort.flower.local``: 0 once the run finished and its table is printed.

    Bad input (usage, config, ``--ranks``, paths: ``UserError`` / ``OSError``) is one
    ``prelort: error: ...`` line on stderr and exit status 2, as for ``prelort`` itself
    (``prelort.cli``); a federation that fails to start or to finish its run (``RuntimeError``)
    is one such line too, with status 1.
    """
    try:
        results, out = _run(_parser().parse_args(argv))
    except UserError as exc:  # usage errors included (_Parser)
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_error_line(exc))
    except RuntimeError as exc:  # not bad input: the federation or its run failed (see its logs)
        _fail(str(exc))
        return 1
    from rich.console import Console

    from prelort.reporting import per_rank_table

    console = Console()
    console.print(per_rank_table(results))
    console.print(f"wrote {out / 'results.json'} (Flower logs: {out / 'flower' / 'logs'})")
    return 0


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Validate ``args``, run the federation; its ``results.json`` and the ``--out`` folder."""
    # `kill` must stop the federation too: SystemExit unwinds through LocalFederation.close
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        if args.nodes is not None and args.nodes <= 0:
            raise UserError("--nodes must be a positive integer")
        if args.workers <= 0:
            raise UserError("--workers must be a positive integer")
        if args.engine == "simulation" and (args.tls or args.auth):
            raise UserError("--tls and --auth apply to --engine deployment only")
        try:
            ranks = [int(r) for r in args.ranks.split(",") if r.strip()] if args.ranks else None
        except ValueError:
            raise UserError(f"--ranks {args.ranks!r}: expected comma-separated integers like 2,4,8") from None
        notes: list[str] = []
        cfg = resolve_config(args.config, args.set, args.nodes, ranks, notes)
        for note in notes:
            print(note, file=sys.stderr)
        results = run_local(
            cfg,
            args.out,
            tls=args.tls,
            auth=args.auth,
            timeout=args.timeout,
            engine=args.engine,
            workers=args.workers,
            node_workers=not args.no_workers,
        )
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return results, Path(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
