"""The Flower app: records, settings, the apps over an in-memory grid, and real deployments.

Fast tests drive ``server_app.run_federation`` and ``client_app.app`` through an in-memory
``Grid`` (no processes) and check that every method gives the simulator's global adapter.
Tests marked ``integration`` start real ``flower-superlink`` / ``flower-supernode`` /
``flwr run`` processes on 127.0.0.1 (free ports) and stop all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flower_support import SMALL_SET, SYNTHETIC, all_dead, reference_run, small_config
from prelort.adapters.state import Adapter, LoRAPair
from prelort.config import Config
from prelort.errors import ConfigError, UserError
from prelort.federation import METHODS
from prelort.federation.artifacts import load_global
from prelort.federation.plan import assign_ranks, build_plan
from prelort.flower import client_app, local
from prelort.flower.certs import make_node_key, make_test_pki
from prelort.flower.records import adapter_to_record, record_to_adapter
from prelort.flower.server_app import run_federation
from prelort.flower.settings import (
    NodeInfo,
    RunSettings,
    node_info_from_config,
    settings_from_run_config,
    split_overrides,
    with_node_ranks,
)
from prelort.workloads import build_workload


def _assert_same_adapter(a: Adapter, b: Adapter, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name].A, b[name].A, atol=atol, rtol=0)
        torch.testing.assert_close(a[name].B, b[name].B, atol=atol, rtol=0)


def _assert_same_metrics(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert set(a) == set(b)
    for level in a:
        assert a[level] == pytest.approx(b[level], rel=1e-5), level


# -- records and settings ---------------------------------------------------------------------
def test_adapter_record_round_trip_is_exact_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    adapter = {
        "model.layers.0.q_proj": LoRAPair(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)),
        "fc2": LoRAPair(
            torch.randn(2, 3, generator=gen).bfloat16(), torch.randn(3, 2, generator=gen).bfloat16()
        ),
    }
    record = adapter_to_record(adapter)
    assert sorted(record) == ["fc2.A", "fc2.B", "model.layers.0.q_proj.A", "model.layers.0.q_proj.B"]
    assert {arr.dtype for arr in record.values()} == {"float32"}  # ArrayRecord refuses bf16
    back = record_to_adapter(record)
    assert torch.equal(back["model.layers.0.q_proj"].A, adapter["model.layers.0.q_proj"].A)
    assert torch.equal(back["fc2"].B, adapter["fc2"].B.float())
    del record["fc2.B"]
    with pytest.raises(ValueError, match="misses array"):
        record_to_adapter(record)


def test_run_config_maps_onto_the_validated_config() -> None:
    assert split_overrides("run.rounds=2; run.method='seg;ment'\nclients.levels=[2; 4]") == (
        "run.rounds=2",
        "run.method='seg;ment'",
        "clients.levels=[2; 4]",
    )
    s = settings_from_run_config({"config": str(SYNTHETIC), "set": "run.rounds=3;run.method='segment'"})
    cfg = s.load()
    assert (cfg.run.rounds, cfg.run.method, cfg.clients.num_clients) == (3, "segment", 8)
    with pytest.raises(ConfigError, match=r"unknown key 'run\.bogus'"):
        settings_from_run_config({"set": "run.bogus=1"}).load()
    with pytest.raises(ConfigError, match="unknown key"):
        settings_from_run_config({"rounds": 3})
    with pytest.raises(ConfigError, match="node-timeout must be a positive number"):
        settings_from_run_config({"node-timeout": "soon"})
    with pytest.raises(ConfigError, match="pass an absolute path"):
        RunSettings("no/such.toml", (), "").load()


def test_node_config_and_node_ranks() -> None:
    assert node_info_from_config({"partition-id": 2, "rank": 8}) == NodeInfo(2, 8)
    assert node_info_from_config({"partition-id": 0}) == NodeInfo(0, None)
    with pytest.raises(ConfigError, match="partition-id must be a non-negative integer"):
        node_info_from_config({"rank": 8})
    cfg = small_config()
    swapped = with_node_ranks(cfg, {0: NodeInfo(0, 8), 1: NodeInfo(1, None), 2: NodeInfo(2, 2)})
    assert swapped.clients.ranks == [8, 4, 2]  # a node's own rank wins, else the config's
    with pytest.raises(ConfigError, match=r"needs exactly 0\.\.2"):
        with_node_ranks(cfg, {0: NodeInfo(0, 2), 1: NodeInfo(1, 4), 5: NodeInfo(5, 8)})
    with pytest.raises(ConfigError, match=r"not in clients\.levels"):
        with_node_ranks(cfg, {0: NodeInfo(0, 3), 1: NodeInfo(1, 4), 2: NodeInfo(2, 8)})


def test_local_cli_rejects_bad_input_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert local.main(["--nodes", "3", "--ranks", "2,4", "--config", str(SYNTHETIC), "--out", "x"]) == 2
    assert "--ranks has 2 entries for --nodes 3" in capsys.readouterr().err
    assert local.main(["--nodes", "3", "--config", str(SYNTHETIC), "--set", "run.bogus=1", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'run.bogus'" in err
    # usage errors and bad values: the one `prelort: error:` line and status 2 of `prelort` itself
    for argv, expected in (
        (["--nodes", "three", "--out", "x"], "argument --nodes: invalid int value: 'three'"),
        (["--config", str(SYNTHETIC)], "the following arguments are required: --out"),
        (["--engine", "ray", "--out", "x"], "argument --engine: invalid choice: 'ray'"),
        (["--ranks", "2,four", "--out", "x"], "--ranks '2,four': expected comma-separated integers"),
        (["--nodes", "0", "--out", "x"], "--nodes must be a positive integer"),
        (["--config", "/no/such/file.toml", "--out", "x"], "/no/such/file.toml"),
    ):
        assert local.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("prelort: error: ") and err.count("\n") == 1 and expected in err, (argv, err)
    notes: list[str] = []
    cfg = local.resolve_config(str(SYNTHETIC), [], 3, None, notes)  # the file samples 4 of 8 per round
    assert (cfg.clients.num_clients, cfg.run.clients_per_round, cfg.clients.ranks) == (3, 3, None)
    assert assign_ranks(cfg) == [2, 4, 8] and "sampling all 3" in notes[0]
    with pytest.raises(UserError, match="not in clients"):
        local.resolve_config(str(SYNTHETIC), [], 2, [2, 3])


def test_test_pki_certificate_and_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pki = make_test_pki(tmp_path, hosts=["10.1.2.3", "link.example"], nodes=2)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example", "localhost"}
    for key, pub in zip(pki.node_keys, pki.node_public_keys, strict=True):
        private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(pub.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
        assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert key.stat().st_mode & 0o077 == 0


# -- the apps over an in-memory grid ------------------------------------------------------------
class InMemoryGrid(Grid):
    """Delivers each message to ``client_app.app`` at once; node i holds partition i."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], fail: set[int] = frozenset()) -> None:
        self.node_configs = node_configs
        self.fail = fail
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            ctx = Context(
                run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={}
            )
            if node in self.fail and msg.metadata.message_type == "train":
                continue  # this node never answers
            self.sent.append(msg)
            self.replies[msg.metadata.message_id] = client_app.app(msg, ctx)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        raise NotImplementedError


def _nodes(ranks: list[int]) -> dict[int, dict[str, Any]]:
    # node ids unlike partition ids, listed out of order: the mapping must come from QUERY
    return {1000 + 7 * (len(ranks) - i): {"partition-id": i, "rank": r} for i, r in enumerate(ranks)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_flower_apps_give_the_simulators_global_adapter(
    method: str, tmp_path: Path, task_identity: None
) -> None:
    cfg = small_config(method, rounds=3)
    client_app._WORKERS.clear()
    grid = InMemoryGrid(_nodes([2, 4, 8]))
    res = run_federation(
        grid, cfg, RunSettings("", (), str(tmp_path), poll_interval=0.01), tmp_path, run_id=7
    )
    ref, ref_state = reference_run(cfg)
    adapter, delta = load_global(tmp_path)
    _assert_same_adapter(adapter, ref_state.adapter)
    if method == "flora":  # every client merged the accumulated base delta before training
        merged = build_plan(cfg).make_rule().merged(ref_state.rule_state)
        assert delta is not None and merged is not None
        for name in delta:
            torch.testing.assert_close(delta[name], merged[name], atol=1e-6, rtol=0)
        assert sum(1 for m in grid.sent if "base-delta" in m.content.array_records) == 6  # rounds 2 and 3
    _assert_same_metrics(res["final"]["per_rank"], ref["final"]["per_rank"])
    for mine, theirs in zip(res["rounds"], ref["rounds"], strict=True):
        for key in ("round", "bytes_up", "bytes_down", "clients", "aggregated", "skipped"):
            assert mine.get(key) == theirs.get(key), key
    assert res["final_ranks"] == ref["final_ranks"] and res["ranks"] == [2, 4, 8]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["engine"]["name"] == "flower" and (tmp_path / "config.toml").is_file()
    # each downlink is the client's own prefix: rank-r factors only
    for msg in grid.sent:
        if msg.metadata.message_type == "train":
            k = msg.content.config_records["config"]["client-id"]
            rank = res["effective_ranks"][k] if method != "hetlora" else None
            got = record_to_adapter(msg.content.array_records["adapter"])
            assert rank is None or all(p.rank == rank for p in got.values())


def test_a_silent_node_is_dropped_like_in_the_simulator(tmp_path: Path, task_identity: None) -> None:
    cfg = small_config("segment", rounds=2)
    client_app._WORKERS.clear()
    nodes = _nodes([2, 4, 8])
    silent = next(n for n, c in nodes.items() if c["partition-id"] == 1)
    grid = InMemoryGrid(nodes, fail={silent})
    res = run_federation(grid, cfg, RunSettings("", (), str(tmp_path), round_timeout=0.05), tmp_path)
    rec = res["rounds"][1]
    assert rec["aggregated"] == [0, 2] and rec["dropped"][0]["client"] == 1
    assert "timed out" in rec["dropped"][0]["reason"]


class CrashingGrid(InMemoryGrid):
    """Fails when asked to send round ``crash_at``'s training (a SuperLink going down)."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], crash_at: int) -> None:
        super().__init__(node_configs)
        self.crash_at = crash_at

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        rounds = {
            m.content.config_records["config"]["server-round"] for m in messages if "config" in m.content
        }
        if self.crash_at in rounds:
            raise ConnectionError("SuperLink unavailable")
        return super().push_messages(messages)


def test_a_restarted_run_resumes_from_its_checkpoint(tmp_path: Path, task_identity: None) -> None:
    cfg = small_config("prelort", rounds=3)
    client_app._WORKERS.clear()
    full = run_federation(InMemoryGrid(_nodes([2, 4, 8])), cfg, RunSettings("", (), ""), tmp_path / "full")
    with pytest.raises(ConnectionError):
        run_federation(
            CrashingGrid(_nodes([2, 4, 8]), crash_at=3), cfg, RunSettings("", (), ""), tmp_path / "b"
        )
    grid = InMemoryGrid(_nodes([2, 4, 8]))
    resumed = run_federation(grid, cfg, RunSettings("", (), ""), tmp_path / "b")
    assert [
        m.content.config_records["config"]["server-round"] for m in grid.sent if "adapter" in m.content
    ] == [3] * 3
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    _assert_same_adapter(load_global(tmp_path / "b")[0], load_global(tmp_path / "full")[0], atol=0)
    assert resumed["final"] == full["final"]


def test_client_evaluate_handler_and_worker_cache(task_identity: None) -> None:
    from prelort.federation.core import initial_state
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import build_nested
    from prelort.federation.transport import ClientJob
    from prelort.flower.transport import FlowerTransport

    cfg = small_config()
    client_app._WORKERS.clear()
    wl = build_workload(cfg)
    plan = build_plan(cfg)
    nested = build_nested(plan, wl)
    rule = plan.make_rule()
    state = initial_state(plan, nested.shapes(), rule)
    transport = FlowerTransport(InMemoryGrid({}), cfg, {0: 11, 1: 12, 2: 13}, timeout=1.0, poll=0.1)
    jobs = [ClientJob(k, rule.downlink(state.adapter, state.client_ranks[k])) for k in (0, 1, 2)]
    train_msg = transport.messages(1, state, jobs)[2]
    msg = Message(content=train_msg.content, dst_node_id=13, message_type=MessageType.EVALUATE)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    ctx = Context(
        run_id=1, node_id=13, node_config={"partition-id": 2, "rank": 8}, state=RecordDict(), run_config={}
    )
    metrics = client_app.app(msg, ctx).content.metric_records["metrics"]
    nested.set_adapter(rule.downlink(state.adapter, 8))
    nested.set_rank(8)
    assert metrics["loss"] == pytest.approx(wl.evaluate(nested.model)["loss"])
    assert metrics["rank"] == 8 and len(client_app._WORKERS) == 1
    client_app.app(msg, ctx)
    assert len(client_app._WORKERS) == 1  # built once, reused by the next message
    wrong = Context(run_id=1, node_id=13, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="node of partition 0"):
        client_app.app(msg, wrong)


# -- the warm worker (prelort.flower.worker) -------------------------------------------------------
def _train_message(cfg: Config, client_id: int = 2, round_: int = 1) -> Message:
    """The train message the Flower transport sends client ``client_id`` in round 1."""
    from prelort.federation.core import initial_state
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import build_nested
    from prelort.federation.transport import ClientJob
    from prelort.flower.transport import FlowerTransport

    plan = build_plan(cfg)
    nested = build_nested(plan, build_workload(cfg))
    rule = plan.make_rule()
    state = initial_state(plan, nested.shapes(), rule)
    transport = FlowerTransport(InMemoryGrid({}), cfg, {0: 11, 1: 12, 2: 13}, timeout=1.0, poll=0.1)
    jobs = [ClientJob(k, rule.downlink(state.adapter, state.client_ranks[k])) for k in (0, 1, 2)]
    msg = transport.messages(round_, state, jobs)[client_id]
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


@pytest.fixture
def worker_address() -> Iterator[str]:
    """A worker serving in a thread of this process on a fresh Unix socket."""
    from prelort.flower.worker import Worker

    folder = Path(tempfile.mkdtemp(prefix="prelort-wt-"))
    path = folder / "w.sock"
    server = Worker(f"unix:{path}", accept_timeout=0.05)
    assert path.is_socket() and path.stat().st_mode & 0o077 == 0  # only its owner may connect
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.address
    server.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and not path.exists()
    shutil.rmtree(folder)


def test_worker_reply_equals_client_update(worker_address: str, task_identity: None) -> None:
    """A train request built like the transport's gets ``client_update``'s prefix back, also
    through the ClientApp with ``worker`` in its node config; evaluate likewise."""
    from prelort.federation.core import client_update
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import build_nested
    from prelort.flower.worker import call

    cfg = small_config()
    client_app._WORKERS.clear()
    msg = _train_message(cfg)
    node = {"partition-id": 2, "rank": 8}
    reply = call(worker_address, "train", msg.content, node)
    wl, plan = build_workload(cfg), build_plan(cfg)
    received = record_to_adapter(msg.content.array_records["adapter"])
    ref = client_update(build_nested(plan, wl), received, client_id=2, round_=1, plan=plan, workload=wl)
    _assert_same_adapter(record_to_adapter(reply.array_records["adapter"]), ref.update.adapter, atol=0)
    metrics = reply.metric_records["metrics"]
    assert (metrics["client-id"], metrics["rank"], metrics["num-examples"]) == (2, 8, ref.update.num_examples)
    assert metrics["train-loss"] == pytest.approx(float(ref.stats.loss), rel=1e-6)
    builds = reply.config_records["worker"]["builds"]
    assert builds == client_app._BUILDS  # the worker runs in this process here
    ctx = Context(
        run_id=1,
        node_id=13,
        node_config={**node, "worker": worker_address},
        state=RecordDict(),
        run_config={},
    )
    via_app = client_app.app(msg, ctx)
    assert via_app.metadata.reply_to_message_id == msg.metadata.message_id
    _assert_same_adapter(
        record_to_adapter(via_app.content.array_records["adapter"]), ref.update.adapter, atol=0
    )
    assert via_app.content.config_records["worker"]["builds"] == builds  # its model, reused
    ev = Message(content=msg.content, dst_node_id=13, message_type=MessageType.EVALUATE)
    ev.metadata.__dict__["_message_id"] = ev.object_id
    remote = client_app.app(ev, ctx).content.metric_records["metrics"]
    local_ = client_app.app(
        ev, Context(run_id=1, node_id=13, node_config=node, state=RecordDict(), run_config={})
    )
    assert dict(remote) == dict(local_.content.metric_records["metrics"])


def test_worker_turns_exceptions_into_error_replies(worker_address: str, task_identity: None) -> None:
    from prelort.flower.worker import WorkerError, call, encode_content, recv_frames, send_frames

    cfg = small_config()
    client_app._WORKERS.clear()
    msg = _train_message(cfg)
    ctx = Context(
        run_id=1,
        node_id=13,
        node_config={"partition-id": 0, "worker": worker_address},
        state=RecordDict(),
        run_config={},
    )
    # the worker's ValueError comes back as an error; the ClientApp raises it, so Flower sends
    # an error reply and the server drops the client with this reason
    with pytest.raises(
        WorkerError, match=r"ValueError: the server sent client 2's work to the node of partition 0"
    ):
        client_app.app(msg, ctx)
    with pytest.raises(WorkerError, match="unknown operation 'fit'"):
        call(worker_address, "fit", msg.content, {})
    with pytest.raises(WorkerError, match="KeyError"):  # a train message without its config record
        call(worker_address, "train", RecordDict({"adapter": msg.content.array_records["adapter"]}), {})
    family, target = socket.AF_UNIX, worker_address.removeprefix("unix:")
    with socket.socket(family, socket.SOCK_STREAM) as s:  # a peer speaking another protocol
        s.connect(target)
        send_frames(s, {"protocol": 99, "op": "train"}, encode_content(msg.content))
        header, body = recv_frames(s)
    assert header["ok"] is False and "protocol 99" in header["error"] and body == b""
    with socket.socket(family, socket.SOCK_STREAM) as s:  # garbage, then hang up
        s.connect(target)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    # still serving
    reply = call(worker_address, "train", msg.content, {"partition-id": 2})
    assert reply.metric_records["metrics"]["client-id"] == 2
    with pytest.raises(WorkerError, match="no worker at"):
        call(worker_address + ".missing", "train", msg.content, {}, connect_timeout=0.1)


def test_forwarding_client_app_imports_no_torch(
    worker_address: str, tmp_path: Path, task_identity: None
) -> None:
    """A ClientApp process that hands its train message to a worker imports neither torch,
    PEFT nor transformers (a fresh interpreter, as Flower starts per message)."""
    from prelort.flower.worker import decode_content, encode_content

    client_app._WORKERS.clear()
    msg = _train_message(small_config())
    (tmp_path / "content.bin").write_bytes(encode_content(msg.content))
    script = f"""
import sys
from pathlib import Path
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from prelort.flower import client_app
from prelort.flower.worker import decode_content, encode_content
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
content = decode_content(Path({str(tmp_path / "content.bin")!r}).read_bytes())
msg = Message(content=content, dst_node_id=13, message_type=MessageType.TRAIN)
msg.metadata.__dict__["_message_id"] = msg.object_id
node = {{"partition-id": 2, "rank": 8, "worker": {worker_address!r}}}
ctx = Context(run_id=1, node_id=13, node_config=node, state=RecordDict(), run_config={{}})
reply = client_app.app(msg, ctx)
Path({str(tmp_path / "reply.bin")!r}).write_bytes(encode_content(reply.content))
heavy = sorted(m for m in ("torch", "peft", "transformers") if m in sys.modules)
assert not heavy, heavy
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    reply = decode_content((tmp_path / "reply.bin").read_bytes())
    assert reply.metric_records["metrics"]["client-id"] == 2
    assert reply.config_records["worker"]["process"].endswith(f":{os.getpid()}")  # computed by the worker


def test_worker_process_exits_with_its_parent_and_on_sigterm(tmp_path: Path) -> None:
    """``python -m prelort.flower.worker``: gone (socket file too) once its parent dies, or on SIGTERM."""
    folder = Path(tempfile.mkdtemp(prefix="prelort-wt-"))
    try:
        parent = subprocess.Popen(["sleep", "120"])
        procs = []
        for name, watched in (("a", parent.pid), ("b", 0)):
            cmd = [sys.executable, "-m", "prelort.flower.worker", "--no-preload", "--address"]
            cmd += [f"unix:{folder / name}.sock", "--parent-pid", str(watched)]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 60
        while not all((folder / f"{n}.sock").exists() for n in "ab"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        a, b = procs
        parent.kill()
        parent.wait()
        assert a.wait(timeout=15) == 0, a.stderr.read() if a.stderr else ""
        assert "parent process" in (a.stderr.read() if a.stderr else "")
        assert b.poll() is None  # watches nothing
        b.terminate()
        assert b.wait(timeout=15) == 128 + 15
        assert not list(folder.iterdir()), "socket files left behind"
    finally:
        for p in [parent, *procs]:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_second_close_returns_only_once_the_socket_file_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind a left-behind socket: the watchdog thread closes the worker, the main
    thread (woken by the closed socket) calls ``close`` too and the process exits. That second
    call must wait for the first one's ``unlink``."""
    from prelort.flower import worker as worker_module

    path = tmp_path / "w.sock"
    server = worker_module.Worker(f"unix:{path}", accept_timeout=0.05)
    real_unlink = os.unlink
    in_unlink = threading.Event()

    def slow_unlink(target: str) -> None:
        in_unlink.set()
        time.sleep(0.3)
        real_unlink(target)

    monkeypatch.setattr(worker_module.os, "unlink", slow_unlink)
    first = threading.Thread(target=server.close)
    first.start()
    assert in_unlink.wait(timeout=10)
    server.close()  # the main thread's call, while the watchdog's is still unlinking
    assert not path.exists()
    first.join(timeout=10)


# -- real processes: SuperLink + SuperNodes + flwr run on loopback ------------------------------
@pytest.mark.integration
def test_loopback_deployment_matches_the_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m prelort.flower.local`: 3 SuperNodes (ranks 2, 4, 8), each with its warm worker,
    2 rounds of prelort."""
    out = tmp_path / "run"
    args = [
        "--nodes",
        "3",
        "--ranks",
        "2,4,8",
        "--config",
        str(SYNTHETIC),
        "--out",
        str(out),
        "--timeout",
        "200",
    ]
    for s in SMALL_SET:
        args += ["--set", s]
    started: list[int] = []
    names: list[str] = []
    sockets: list[Path] = []
    close = local.LocalFederation.close

    def close_and_record(self: local.LocalFederation, grace: float = 10.0) -> None:
        for s in self.processes:
            started.extend([s.proc.pid, *local.descendants(s.proc.pid)])
            names.append(s.name)
        if self.worker_dir is not None:
            sockets.append(self.worker_dir)
        close(self, grace)

    monkeypatch.setattr(local.LocalFederation, "close", close_and_record)
    assert local.main(args) == 0, capsys.readouterr().err
    assert "rel_loss" in capsys.readouterr().out
    cfg = small_config("prelort", rounds=2)
    ref, ref_state = reference_run(cfg)
    adapter, _ = load_global(out)
    _assert_same_adapter(adapter, ref_state.adapter)
    res = json.loads((out / "results.json").read_text())
    _assert_same_metrics(res["final"]["per_rank"], ref["final"]["per_rank"])
    assert res["ranks"] == [2, 4, 8] and len(res["engine"]["nodes"]) == 3
    assert [r["bytes_down"] for r in res["rounds"]] == [r["bytes_down"] for r in ref["rounds"]]
    # every train message was computed by its node's worker: 3 processes, one model build each
    assert res["engine"]["workers"] == {"client_processes": 3, "model_builds": 3}
    assert sorted(n for n in names if n.startswith("worker-")) == ["worker-0", "worker-1", "worker-2"]
    assert len(started) >= 7 and not all_dead(started), "processes left running"
    assert not local.processes_under(out / "flower"), "processes left running"
    assert len(sockets) == 1 and not sockets[0].exists(), "worker sockets left behind"


@pytest.mark.integration
def test_tls_and_supernode_auth_refuse_an_unregistered_node(tmp_path: Path) -> None:
    """TLS + SuperNode authentication: 3 registered nodes train FlexLoRA, a 4th key is refused."""
    cfg = small_config("flexlora", rounds=1)
    work = tmp_path / "fed"
    work.mkdir()
    conf = work / "prelort.toml"
    from prelort.config import config_to_dict, dump_toml

    conf.write_text(dump_toml(config_to_dict(cfg)))
    pids: list[int] = []
    with local.LocalFederation(work, [2, 4, 8], auth=True) as fed:
        assert fed.ca_cert is not None
        # the SuperLink speaks TLS with a certificate for 127.0.0.1 from our CA
        ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        make_node_key(work / "intruder")  # a valid key pair, never registered
        intruder = fed.start_supernode(3, 8, work / "intruder", name="intruder")
        fed.run({"config": str(conf), "out": str(tmp_path / "run")}, timeout=200)  # 3 nodes train
        assert intruder.proc.wait(timeout=60) != 0  # refused: it exits instead of serving
        assert "Failed to activate SuperNode" in intruder.log.read_text()
        link_log = (work / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log
        nodes = fed.supernodes()  # only the registered keys are known, all online
        assert len(nodes) == 3 and {n["status"] for n in nodes} == {"online"}, nodes
        assert sum(s.name.startswith("worker-") for s in fed.processes) == 4  # the intruder's too
        sockets = fed.worker_dir
        for s in fed.processes:
            pids += [s.proc.pid, *local.descendants(s.proc.pid)]
    assert not all_dead(pids), "processes left running"
    assert not local.processes_under(work), "processes left running"
    assert sockets is not None and not sockets.exists(), "worker sockets left behind"
    _, ref_state = reference_run(cfg)
    _assert_same_adapter(load_global(tmp_path / "run")[0], ref_state.adapter)
