"""Secure aggregation over Flower (issue #12): SecAgg+ rounds of the sum form.

The ServerApp's ``run_federation`` and the real ``client_app.app`` (with its SecAgg+ mod)
talk through an in-memory grid that keeps every node's Flower context (SecAgg+ keeps its
keys there between stages) and can make a node drop out at a chosen protocol stage. The
final adapter must equal the in-process run of the same config up to SecAgg+'s
quantization, and the server must only ever receive masked vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prelort.federation.plan import build_plan

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid

from flower_support import SMALL_SET, SYNTHETIC
from prelort.config import Config
from prelort.federation import run_simulation
from prelort.federation.artifacts import load_global
from prelort.federation.checkpoint import _read
from prelort.federation.core import ClientResult, ServerState, client_update
from prelort.flower import client_app, local
from prelort.flower.server_app import run_federation
from prelort.flower.settings import RunSettings
from prelort.workloads import build_workload

RANKS = [2, 4, 8, 8]
# the Flower tests' acceptance federation with a fourth client, all sampled, under SecAgg+
SMALL = [*SMALL_SET, "run.clients_per_round=4", "run.method='prelort'", "privacy.secure_aggregation=true"]
# factor-level bounds: ownership order (the importance order's SVD can turn the quantization
# error into a rotation inside a near-degenerate singular subspace; its own test checks products)
SMALL.append("aggregation.order='ownership'")


def _cfg(extra: list[str] = ()) -> Config:  # type: ignore[assignment]
    return local.resolve_config(str(SYNTHETIC), [*SMALL, *extra], len(RANKS), RANKS)


class SecAggGrid(Grid):
    """Delivers each message to ``client_app.app`` with the node's own persistent Context.

    ``drop`` maps (client id, round) to the SecAgg+ stage at which that node stops answering
    (e.g. ``"collect_masked_vectors"``). ``replies`` keeps every reply the server received.
    """

    def __init__(self, ranks: list[int], drop: dict[tuple[int, int], str] | None = None) -> None:
        self.node_configs = {500 + 3 * i: {"partition-id": i, "rank": r} for i, r in enumerate(ranks)}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
            for n, c in self.node_configs.items()
        }
        self.drop = drop or {}
        self.round = 0
        self.pending: dict[str, Message] = {}
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            conf = msg.content.config_records
            if RECORD_KEY_CONFIGS in conf:
                stage = str(conf[RECORD_KEY_CONFIGS][Key.STAGE])
                if stage == "setup":
                    self.round = int(msg.metadata.group_id)
                k = int(self.node_configs[node]["partition-id"])
                if self.drop.get((k, self.round)) == stage:
                    continue  # this node has gone: no reply
            # a SuperNode gets its own copy of the content (the workflow shares one between nodes)
            copy = Message(
                recorddict_from_proto(recorddict_to_proto(msg.content)),
                dst_node_id=node,
                message_type=msg.metadata.message_type,
                group_id=msg.metadata.group_id,
            )
            copy.metadata.__dict__["_message_id"] = msg.metadata.message_id
            try:
                reply = client_app.app(copy, self.contexts[node])
            except Exception as exc:  # what a SuperNode sends back when its ClientApp raised
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=copy)
            self.pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = [self.pending.pop(i) for i in list(message_ids) if i in self.pending]
        self.replies.extend(got)
        return got

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))  # pragma: no cover - the transport polls

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        raise NotImplementedError


def _in_process(
    cfg: Config, fail: set[tuple[int, int]] = frozenset()
) -> tuple[dict[str, Any], list[ServerState]]:  # type: ignore[assignment]
    """The in-process run (trusted sum of the same messages); clients in ``fail`` raise."""

    def client_fn(*args: Any, **kwargs: Any) -> ClientResult:
        if (kwargs["client_id"], kwargs["round_"]) in fail:
            raise RuntimeError("gone")
        return client_update(*args, **kwargs)

    states: list[ServerState] = []
    res = run_simulation(
        cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s), client_fn=client_fn
    )
    return res, states


def _max_diff(a: Any, b: Any) -> float:
    return max(max(float((a[n].A - b[n].A).abs().max()), float((a[n].B - b[n].B).abs().max())) for n in a)


def test_secagg_with_importance_order_gives_the_plain_products(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PreLort's default (importance order every round) under SecAgg+: the server re-orders the
    unmasked sums, so the full product equals the in-process one up to the quantization error
    and every prefix is the best rank-r approximation of it (SVD computed here)."""
    cfg = _cfg(["run.rounds=1", "aggregation.order='auto'"])  # PreLort's default: round
    assert cfg.run.method == "prelort" and build_plan(cfg).order == "round"
    _run(tmp_path, cfg, SecAggGrid(RANKS), monkeypatch)
    _, states = _in_process(cfg)
    adapter, _ = load_global(tmp_path)
    ref = states[-1].adapter
    for name in ref:
        got = adapter[name].B.double() @ adapter[name].A.double()
        want = ref[name].B.double() @ ref[name].A.double()
        assert float(torch.linalg.norm(got - want)) < 1e-2 * float(torch.linalg.norm(want))
        U, S, Vh = torch.linalg.svd(got, full_matrices=False)
        for r in (2, 4):
            prefix = adapter[name].B[:, :r].double() @ adapter[name].A[:r].double()
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(prefix, best, rtol=1e-4, atol=1e-6)


def _run(tmp_path: Path, cfg: Config, grid: SecAggGrid, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # the server-side paths that read an individual update must not run under SecAgg+
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the server touched an individual update")

    client_app._WORKERS.clear()
    settings = RunSettings("", (), str(tmp_path), round_timeout=0.3, poll_interval=0.01)
    with monkeypatch.context() as m:
        m.setattr("prelort.flower.transport.parse_reply", refuse)
        m.setattr("prelort.federation.driver.sum_outcomes", refuse)
        return run_federation(grid, cfg, settings, tmp_path, run_id=3)


def test_secagg_round_equals_the_plain_sum_up_to_quantization(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(["run.rounds=1"])
    grid = SecAggGrid(RANKS)
    res = _run(tmp_path, cfg, grid, monkeypatch)
    ref, states = _in_process(cfg)
    adapter, _ = load_global(tmp_path)
    rec = res["rounds"][1]
    assert rec["aggregated"] == [0, 1, 2, 3] and rec["rows"] == 8 and not rec["dropped"]
    assert rec["bytes_up"] == ref["rounds"][1]["bytes_up"] and rec["wire_bytes_up"] > 0
    assert res["privacy"]["secure_aggregation"] and "epsilon" not in res["privacy"]
    # one round from the same global: the only difference is SecAgg+'s stochastic rounding.
    # Every client quantizes each entry to a grid of step 2c / 2^bits (error < 1 step), so a
    # summed entry is off by < n steps and row i's average S_i / W_i by
    # < n step (1 + |S_i / W_i|) / (W_i - n step), with W_i = sum of n_k / max_weight.
    p = cfg.privacy
    assert p is not None
    step = 2 * p.secagg_clipping_range / 2**p.secagg_bits
    n = 4
    sizes = [build_workload(cfg).num_examples(k) for k in range(4)]
    weights = torch.tensor(
        [sum(sizes[k] for k in range(4) if RANKS[k] > i) / p.secagg_max_weight for i in range(8)]
    )
    err = _max_diff(adapter, states[-1].adapter)
    bound = float((n * step * (1 + 1.0) / (weights - n * step)).max())  # entries here are below 1
    assert 0 < err < bound, (err, bound)
    print(f"SecAgg+ error after one round: {err:.3g} (bound {bound:.3g}, step {step:.3g})")
    # what reached the server: masked vectors (config bytes) and no arrays at all
    masked = 0
    for msg in grid.replies:
        if msg.has_error():
            continue
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            masked += Key.MASKED_PARAMETERS in msg.content.config_records[RECORD_KEY_CONFIGS]
        assert "metrics" not in msg.content.metric_records  # no per-client loss or n_k
    assert masked == 4
    # every client's reply tells n_k to nobody: SecAgg+ saw num_examples = 1
    nums = [
        m.content.metric_records["fitres.num_examples"]["num_examples"]
        for m in grid.replies
        if "fitres.num_examples" in m.content.metric_records
    ]
    assert nums == [1, 1, 1, 1]


def test_secagg_handles_clients_dropping_out_mid_protocol(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1: client 0 leaves before sending its masked vector (its masks are removed from
    the others' key shares); round 2: client 2 leaves after sending it, before unmasking
    (its vector counts). 3 of 4 live clients meet SecAgg+'s threshold (round(0.67 * 4) = 3)."""
    cfg = _cfg()
    drop = {(0, 1): "collect_masked_vectors", (2, 2): "unmask"}
    res = _run(tmp_path, cfg, SecAggGrid(RANKS, drop), monkeypatch)
    r1, r2 = res["rounds"][1], res["rounds"][2]
    assert r1["aggregated"] == [1, 2, 3] and [d["client"] for d in r1["dropped"]] == [0]
    assert "dropped out of SecAgg+" in r1["dropped"][0]["reason"] and not r1["skipped"]
    assert r2["aggregated"] == [0, 1, 2, 3] and not r2["dropped"]
    ref, states = _in_process(cfg, fail={(0, 1)})
    assert ref["rounds"][1]["aggregated"] == [1, 2, 3]
    # after round 1 (same global, same clients): SecAgg+'s rounding only, as in the test above
    after_one, _ = _read(tmp_path / "checkpoints" / "round-000001", cfg)
    err1 = _max_diff(after_one.adapter, states[0].adapter)
    assert err1 < 2e-4, err1
    # round 2 trains from globals 1e-4 apart; Adam's normalised steps on the near-zero
    # gradients of A (B was 0 until round 1) turn that into differences up to ~lr
    adapter, _ = load_global(tmp_path)
    err2 = _max_diff(adapter, states[-1].adapter)
    print(f"SecAgg+ error with dropouts: {err1:.3g} after round 1, {err2:.3g} after round 2")
    assert err2 < 3 * cfg.train.lr


def test_secagg_below_the_threshold_skips_the_round(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(["run.rounds=1"])
    drop = {(0, 1): "collect_masked_vectors", (1, 1): "collect_masked_vectors"}
    res = _run(tmp_path, cfg, SecAggGrid(RANKS, drop), monkeypatch)
    rec = res["rounds"][1]
    assert rec["skipped"] and rec["aggregated"] == []
    assert "halted" in rec["dropped"][0]["reason"]
    init = res["rounds"][0]["per_rank"]
    assert rec["per_rank"] == init  # the global adapter was kept


def test_secagg_with_differential_privacy(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clipped updates under SecAgg+, central noise added by the server after unmasking: with a
    fixed noise seed the result equals the in-process DP run up to quantization."""
    dp = ["privacy.clip=0.5", "privacy.noise_multiplier=0.8", "privacy.delta=1e-5", "privacy.noise_seed=11"]
    cfg = _cfg(["run.rounds=1", "privacy.min_segment_owners=1", *dp])
    res = _run(tmp_path, cfg, SecAggGrid(RANKS), monkeypatch)
    ref, states = _in_process(cfg)
    adapter, _ = load_global(tmp_path)
    err = _max_diff(adapter, states[-1].adapter)
    assert err < 1e-4, err
    assert res["privacy"]["epsilon"] == pytest.approx(ref["privacy"]["epsilon"])
    assert "after SecAgg+ unmasking" in res["privacy"]["noise"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["privacy"]["clip"] == 0.5 and np.isfinite(on_disk["privacy"]["epsilon"])


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["simulation", "deployment"])
def test_secagg_end_to_end_on_flower(engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m prelort.flower.local`` with ``privacy.secure_aggregation``: SecAgg+ on Flower's
    simulation engine (Ray) and on a loopback deployment (4 SuperNode processes) ends with the
    in-process run's adapter up to SecAgg+'s rounding, and stops every process it started."""
    if engine == "simulation":
        pytest.importorskip("ray")
    out = tmp_path / "run"
    args = ["--engine", engine, "--nodes", "4", "--ranks", ",".join(map(str, RANKS))]
    args += ["--config", str(SYNTHETIC), "--out", str(out), "--timeout", "500"]
    for s in SMALL:
        args += ["--set", s]
    assert local.main(args) == 0, capsys.readouterr().err
    cfg = _cfg()
    ref, states = _in_process(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["engine"]["name"] == "flower" and res["privacy"]["secure_aggregation"]
    for mine, theirs in zip(res["rounds"][1:], ref["rounds"][1:], strict=True):
        assert mine["aggregated"] == theirs["aggregated"] == [0, 1, 2, 3]
        assert mine["bytes_up"] == theirs["bytes_up"] and mine["rows"] == theirs["rows"] == 8
    after_one, _ = _read(out / "checkpoints" / "round-000001", cfg)
    err1 = _max_diff(after_one.adapter, states[0].adapter)
    adapter, _ = load_global(out)
    err2 = _max_diff(adapter, states[-1].adapter)
    print(f"{engine}: SecAgg+ error {err1:.3g} after round 1, {err2:.3g} after round 2")
    assert err1 < 2e-4 and err2 < 3 * cfg.train.lr
    assert not local.processes_under(out / "flower"), "processes left running"
