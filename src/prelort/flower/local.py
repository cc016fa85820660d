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
touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prelort.config import Config, config_to_dict, dump_toml, load_config
from prelort.errors import UserError
from prelort.flower import APP_DIR

CONNECTION = "prelort-local"
ENGINES = ("deployment", "simulation")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tool(name: str) -> str:
    """A Flower executable next to this Python (the venv's bin), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name} not found; install the extra: pip install 'prelort[flower]'")
    return found


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (POSIX ``ps``)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=False)
    table: dict[int, tuple[int, str]] = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) > 2 else "")
    return table


def descendants(pid: int) -> list[int]:
    """Every descendant pid of ``pid`` (children first level first)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_under(workdir: Path) -> list[int]:
    """Live processes whose ``FLWR_HOME`` lies under ``workdir`` (Linux ``/proc``; else []).

    Every process a ``LocalFederation`` starts gets such an ``FLWR_HOME`` and passes it on to
    what it spawns, so this finds them even after their parent died (e.g. the SuperExec of a
    SuperNode the SuperLink refused).
    """
    marker = f"FLWR_HOME={Path(workdir).absolute()}{os.sep}".encode()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(var.startswith(marker) for var in environ.split(b"\0")) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        return False
    state = Path(f"/proc/{pid}/stat")
    if state.is_file():  # a zombie has exited; its parent reaps it
        try:
            return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


@dataclass
class Started:
    """A process this federation started, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalFederation:
    """One SuperLink and N SuperNodes on 127.0.0.1; use as a context manager.

    Parameters
    ----------
    workdir : Path
        Logs, FLWR_HOMEs, certificates and the run config go here.
    ranks : Sequence[int]
        Rank capacity of SuperNode i (its ``partition-id`` is i).
        On the simulation engine only the count matters (one virtual SuperNode per entry);
        the ranks then come from the run's config.
    tls : bool
        Serve the SuperLink over TLS with a fresh test CA (``certs.make_test_pki``).
    auth : bool
        Enable SuperNode authentication and register one key per node (implies ``tls``).
    engine : str
        ``"deployment"`` (SuperNode processes) or ``"simulation"`` (Flower's simulation
        engine: a ``--simulation`` SuperLink and a Ray pool of ClientApp workers).
    workers : int
        Simulation engine: ClientApp workers (Ray actors), each with its own model copy.
    node_workers : bool
        Deployment engine: start a warm worker (``prelort.flower.worker``) next to every
        SuperNode and name it in the node's config, so the ClientApp processes that Flower
        starts per message hand their work to a process that keeps the model loaded.
    """

    workdir: Path
    ranks: Sequence[int]
    tls: bool = False
    auth: bool = False
    engine: str = "deployment"
    workers: int = 1
    node_workers: bool = True
    port: int = 0
    """The SuperLink's port (all its APIs), chosen at ``start``."""
    ca_cert: Path | None = None
    """The test CA SuperNodes and the CLI trust (TLS only)."""
    processes: list[Started] = field(default_factory=list)
    node_keys: list[Path] = field(default_factory=list)
    ray_tmp: Path | None = None
    """Simulation engine: Ray's temp folder (``RAY_TMPDIR``), removed by ``close``."""
    worker_dir: Path | None = None
    """Deployment engine: the folder of the workers' Unix sockets, removed by ``close``."""

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).absolute()
        self.tls = self.tls or self.auth
        self.logs = self.workdir / "logs"
        self.pki_dir = self.workdir / "pki"
        if self.engine not in ENGINES:
            raise UserError(f"engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.simulation and self.tls:
            raise UserError("TLS and SuperNode authentication apply to the deployment engine only")
        if self.workers < 1:
            raise UserError(f"workers must be a positive integer, got {self.workers}")

    @property
    def simulation(self) -> bool:
        """True on Flower's simulation engine."""
        return self.engine == "simulation"

    def threads_per_process(self) -> int:
        """Torch threads for each ClientApp process (SuperNode or simulation worker)."""
        share = len(self.ranks) if not self.simulation else min(self.workers, max(1, len(self.ranks)))
        return max(1, (os.cpu_count() or 1) // max(1, share))

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _env(self, home: str, threads: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if threads is not None:  # N SuperNodes share this machine: no oversubscribed torch threads
            env.setdefault("OMP_NUM_THREADS", str(threads))
            env.setdefault("MKL_NUM_THREADS", str(threads))
        env["FLWR_HOME"] = str(self.workdir / "home" / home)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # SuperExec asks for new tasks every second by default; loopback can afford less.
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports from test federations
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.ray_tmp is not None:  # a Ray instance of our own, not one the environment names
            env["RAY_TMPDIR"] = str(self.ray_tmp)
            env.pop("RAY_ADDRESS", None)
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def _spawn(self, name: str, cmd: list[str], home: str, threads: int | None = None) -> Started:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self._env(home, threads),
                cwd=self.workdir,
                start_new_session=True,
            )
        started = Started(name, proc, log)
        self.processes.append(started)
        return started

    def start(self) -> None:
        """SuperLink, node registration (auth), SuperNodes, and the CLI connection."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.simulation:
            self.start_simulation()
            return
        if self.tls:
            from prelort.flower.certs import make_test_pki

            pki = make_test_pki(self.pki_dir, nodes=len(self.ranks) if self.auth else 0)
            self.ca_cert = pki.ca_cert
            self.node_keys = list(pki.node_keys)
        if self.node_workers:  # short: a Unix socket path must fit in 108 bytes
            self.worker_dir = Path(tempfile.mkdtemp(prefix="prelort-w-"))
        self.port = free_ports(1)[0]
        cmd = [
            _tool("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            cmd += [
                "--ssl-certfile",
                str(self.pki_dir / "server.crt"),
                "--ssl-keyfile",
                str(self.pki_dir / "server.key"),
                "--ssl-ca-certfile",
                str(self.ca_cert),
            ]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        link = self._spawn("superlink", cmd, "superlink")
        self._write_cli_config()
        self._wait_for_port(link, self.port, timeout=60)
        for key in self.node_keys:
            self.register(key.with_name(key.name + ".pub"))
        for i, rank in enumerate(self.ranks):
            self.start_supernode(i, rank, self.node_keys[i] if self.auth else None)

    def start_simulation(self) -> None:
        """A ``--simulation`` SuperLink (no SuperNodes: ``flwr run`` names their number)."""
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError("the simulation engine needs Ray: pip install 'flwr[simulation]'")
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="prelort-ray-"))
        self.port = free_ports(1)[0]
        cmd = [
            _tool("flower-superlink"),
            "--simulation",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        link = self._spawn("superlink", cmd, "superlink", self.threads_per_process())
        self._write_cli_config()
        self._wait_for_port(link, self.port, timeout=60)

    def federation_config(self) -> str:
        """``flwr run --federation-config`` of the simulation engine: nodes and Ray workers."""
        return (
            f"num-supernodes={len(self.ranks)} init-args-num-cpus={self.workers} client-resources-num-cpus=1"
        )

    def start_supernode(
        self, partition_id: int, rank: int | None, key: Path | None, name: str = ""
    ) -> Started:
        """One SuperNode for client ``partition_id`` (``key``: its auth private key), with its
        warm worker unless ``node_workers`` is off."""
        port = free_ports(1)[0]
        name = name or f"supernode-{partition_id}"
        node_config = f"partition-id={partition_id}" + (f" rank={rank}" if rank is not None else "")
        if self.worker_dir is not None:
            node_config += f" worker='{self.start_worker(name)}'"
        cmd = [
            _tool("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]
        cmd += ["--root-certificates", str(self.ca_cert)] if self.ca_cert is not None else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return self._spawn(name, cmd, name, self.threads_per_process())

    def start_worker(self, node: str, timeout: float = 60) -> str:
        """A warm worker for SuperNode ``node`` on a Unix socket; returns its address once it
        listens. It exits with this process (``--parent-pid``) even if ``close`` never runs."""
        assert self.worker_dir is not None
        path = self.worker_dir / f"{node}.sock"
        address = f"unix:{path}"
        cmd = [
            sys.executable,
            "-m",
            "prelort.flower.worker",
            "--address",
            address,
            "--parent-pid",
            str(os.getpid()),
        ]
        name = f"worker-{node.removeprefix('supernode-')}"
        started = self._spawn(name, cmd, name, self.threads_per_process())
        deadline = time.monotonic() + timeout
        while not path.exists():
            if started.proc.poll() is not None:
                raise RuntimeError(f"{name} exited early; see {started.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on {path} within {timeout:g} s; see {started.log}")
            time.sleep(0.05)
        return address

    def _write_cli_config(self) -> None:
        home = self.workdir / "home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "127.0.0.1:{self.port}"',
        ]
        lines.append(
            f'root-certificates = "{self.ca_cert}"' if self.ca_cert is not None else "insecure = true"
        )
        (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _wait_for_port(self, started: Started, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if started.proc.poll() is not None:
                raise RuntimeError(f"{started.name} exited early; see {started.log}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{started.name} did not open port {port} within {timeout:g} s; see {started.log}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this federation's connection."""
        return subprocess.run(
            [_tool("flwr"), *args],
            capture_output=True,
            text=True,
            env=self._env("cli"),
            cwd=self.workdir,
            timeout=timeout,
            check=False,
        )

    def register(self, public_key: Path) -> None:
        """``flwr supernode register KEY.pub prelort-local`` (SuperNode authentication)."""
        deadline = time.monotonic() + 60
        while True:
            res = self.flwr("supernode", "register", str(public_key), CONNECTION)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"flwr supernode register {public_key} failed: {res.stdout}{res.stderr}")
            time.sleep(0.5)

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls --format json``: the SuperLink's view of the nodes."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed: {res.stdout}{res.stderr}")
        data = json.loads(res.stdout)
        nodes: list[dict[str, Any]] = data.get("nodes", []) if isinstance(data, dict) else data
        return nodes

    def run(
        self, run_config: dict[str, str | int | float], *, timeout: float = 3600, app_dir: Path = APP_DIR
    ) -> int:
        """``flwr run`` the PreLort app (or ``app_dir``) with ``run_config``; wait; return the run id.

        RuntimeError (pointing at the logs) if the run does not finish successfully.
        """
        conf_file = self.workdir / "run-config.toml"
        conf_file.write_text(
            "\n".join(f"{k} = {json.dumps(v)}" for k, v in run_config.items()) + "\n", encoding="utf-8"
        )
        log = self.logs / "flwr-run.log"
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(conf_file), "--stream"]
        if self.simulation:
            cmd += ["--federation-config", self.federation_config()]
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self._env("cli"),
                cwd=self.workdir,
                start_new_session=True,
            )
            self.processes.append(Started("flwr-run", proc, log))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                run_id = _run_id(log)
                if run_id is not None:
                    self.flwr("stop", str(run_id), CONNECTION)
                raise RuntimeError(f"the Flower run did not finish within {timeout:g} s; see {log}") from None
        run_id = _run_id(log)
        if proc.returncode != 0 or run_id is None:
            raise RuntimeError(f"flwr run failed (exit {proc.returncode}); see {log}")
        status = self.run_status(run_id)
        if not status.startswith("finished:completed"):
            raise RuntimeError(f"run {run_id} ended with status {status}; logs in {self.logs}")
        return run_id

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it: ``finished:completed`` or, e.g.,
        ``finished:failed (ServerApp failed with exception: <the error>)``."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            return f"unknown ({res.stdout.strip()} {res.stderr.strip()})"
        if not runs:
            return "unknown"
        status = str(runs[0].get("status", "unknown"))
        details = str(runs[0].get("status-details", "N/A"))
        return status if details in ("", "N/A") else f"{status} ({details})"

    def close(self, grace: float = 10.0) -> None:
        """Stop every process started here and everything they spawned (SuperExec, apps)."""
        tree: list[int] = processes_under(self.workdir)
        for s in self.processes:
            if s.proc.poll() is None:
                tree += descendants(s.proc.pid)
        for s in reversed(self.processes):  # SuperNodes and the CLI first, SuperLink last
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s in self.processes:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(timeout=5)
        # Children that outlived their parent (the SuperLink's SuperExec runs in its own session,
        # a refused SuperNode's SuperExec is orphaned), found by pid or by their FLWR_HOME.
        started = {s.proc.pid for s in self.processes}
        leftovers = [pid for pid in {*tree, *processes_under(self.workdir)} - started if _alive(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + 5
            while (leftovers := [p for p in leftovers if _alive(p)]) and time.monotonic() < end:
                time.sleep(0.1)
            if not leftovers:
                break
        self.processes.clear()
        if self.worker_dir is not None:
            shutil.rmtree(self.worker_dir, ignore_errors=True)
            self.worker_dir = None
        if self.ray_tmp is not None:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
            self.ray_tmp = None


def _run_id(log: Path) -> int | None:
    match = re.search(r"started run (\d+)", log.read_text(encoding="utf-8", errors="replace"))
    return int(match.group(1)) if match else None


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
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
    args = p.parse_args(argv)
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
    except UserError as exc:
        print(f"prelort.flower.local: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"prelort.flower.local: {exc}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    from rich.console import Console

    from prelort.reporting import per_rank_table

    console = Console()
    console.print(per_rank_table(results))
    console.print(
        f"wrote {Path(args.out) / 'results.json'} (Flower logs: {Path(args.out) / 'flower' / 'logs'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
