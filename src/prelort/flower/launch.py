"""Launching a loopback Flower federation: ``LocalFederation``, one SuperLink and N SuperNodes
(or a ``--simulation`` SuperLink) on 127.0.0.1, and ``flwr`` CLI calls against it.

``prelort.flower.local`` (``python -m prelort.flower.local``) runs a PreLort config on it and
describes the processes; ``prelort.flower.process_tree`` finds and stops what they spawn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prelort.errors import UserError
from prelort.flower import APP_DIR
from prelort.flower.process_tree import descendants, processes_under, stop

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
        cmd = [_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--disable-runtime-dependency-installation"]
        if self.tls:
            cmd += ["--ssl-certfile", str(self.pki_dir / "server.crt")]
            cmd += ["--ssl-keyfile", str(self.pki_dir / "server.key"), "--ssl-ca-certfile", str(self.ca_cert)]
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
        cmd = [_tool("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--disable-runtime-dependency-installation"]
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
        cmd = [_tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(port)]
        cmd += ["--node-config", node_config]
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
        cmd = [sys.executable, "-m", "prelort.flower.worker", "--address", address]
        cmd += ["--parent-pid", str(os.getpid())]
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
        started = {s.proc.pid for s in self.processes}
        # The apps (SuperExec, ServerApp, flwr-simulation) first: a ServerApp left running while
        # the SuperLink shuts down goes on with its rounds (a simulation runs its own clients)
        # and could finish and write results after `close` was called.
        stop(set(tree) - started, timeout=grace)
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
        stop({*tree, *processes_under(self.workdir)} - started, timeout=5)
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
