"""The round loop (``RoundDriver``) against a scripted transport: what each client "returns" is
written in the test, so every record, drop, skip and the aggregate are expected values computed
here, independently of the driver.

Script (4 clients of ranks 2, 4, 2, 4, all sampled, ``run.min_clients = 2``,
``run.client_timeout = 5``, ``run.eval_every = 2``, 3 rounds, method ``segment``):

- round 1: every client answers: all four aggregated;
- round 2: client 0 raises, client 1 never answers, client 2 is late (10 s), client 3 answers:
  one valid update < min_clients, so the round is skipped and the global adapter kept;
- round 3: client 0 sends a NaN update (rejected), clients 1-3 are aggregated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from prelort.adapters.state import Adapter, LoRAPair, adapter_num_bytes
from prelort.aggregation.base import ClientUpdate
from prelort.config import load_config
from prelort.federation.core import ClientResult, ServerState
from prelort.federation.driver import RoundDriver
from prelort.federation.plan import build_plan
from prelort.federation.simulator import build_nested
from prelort.federation.transport import ClientJob, ClientOutcome
from prelort.training.local import TrainStats
from prelort.workloads import build_workload

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "run.method='segment'",
    "run.rounds=3",
    "run.eval_every=2",
    "run.clients_per_round=4",
    "run.min_clients=2",
    "run.client_timeout=5",
    "clients.num_clients=4",
    "clients.levels=[2, 4]",
    "clients.ranks=[2, 4, 2, 4]",
    "synthetic.hidden=8",
    "synthetic.test_examples=20",
]
SIZES = {0: 10, 1: 20, 2: 30, 3: 40}
SCRIPT = {
    1: {0: "ok", 1: "ok", 2: "ok", 3: "ok"},
    2: {0: "raise", 1: "silent", 2: "late", 3: "ok"},
    3: {0: "nan", 1: "ok", 2: "ok", 3: "ok"},
}


def _reply(k: int, t: int, received: Adapter) -> Adapter:
    """Client k's scripted adapter in round t: its received factors plus (k + 1) t / 10."""
    return {n: LoRAPair(p.A + (k + 1) * t / 10, p.B - (k + 1) * t / 10) for n, p in received.items()}


class ScriptedTransport:
    def __init__(self) -> None:
        self.sent: dict[int, dict[int, Adapter]] = {}

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        self.sent[round_] = {job.client_id: job.received for job in jobs}
        out = []
        for job in jobs:
            k, what = job.client_id, SCRIPT[round_][job.client_id]
            if what == "silent":
                continue
            if what == "raise":
                out.append(ClientOutcome(k, error="raised RuntimeError: scripted"))
                continue
            adapter = _reply(k, round_, job.received)
            if what == "nan":
                adapter = {n: LoRAPair(p.A * float("nan"), p.B) for n, p in adapter.items()}
            rank = next(iter(job.received.values())).rank
            stats = TrainStats(loss=float(k), steps=1, loss_per_level={}, passes=k + 1, examples=2 * (k + 1))
            result = ClientResult(ClientUpdate(adapter, rank, SIZES[k], k), stats)
            out.append(ClientOutcome(k, result, seconds=10.0 if what == "late" else 0.1))
        return out


def _segment_average(g: Adapter, replies: dict[int, Adapter], ranks: dict[int, int]) -> Adapter:
    """Row i of A (column i of B): the n_k-weighted mean over the clients with rank > i."""
    out = {}
    for name, pair in g.items():
        A, B = pair.A.clone().double(), pair.B.clone().double()
        for i in range(A.shape[0]):
            owners = [k for k in replies if ranks[k] > i]
            if owners:
                total = sum(SIZES[k] for k in owners)
                A[i] = sum(SIZES[k] * replies[k][name].A[i].double() for k in owners) / total
                B[:, i] = sum(SIZES[k] * replies[k][name].B[:, i].double() for k in owners) / total
        out[name] = LoRAPair(A.float(), B.float())
    return out


def test_round_loop_follows_the_script() -> None:
    cfg = load_config(ROOT / "configs" / "synthetic.toml", SETS)
    plan, workload = build_plan(cfg), build_workload(cfg)
    transport = ScriptedTransport()
    states: list[ServerState] = []
    records: list[dict] = []
    driver = RoundDriver(
        plan,
        transport,
        build_nested(plan, workload),
        workload,
        on_state=lambda s, _r: states.append(s),
        on_round=records.append,
    )
    state0, rounds = driver.start()
    final, rounds = driver.run(state0, rounds)
    ranks = {0: 2, 1: 4, 2: 2, 3: 4}

    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and records == rounds
    assert [s.round for s in states] == [1, 2, 3]  # a state (checkpoint) after every round
    assert [("per_rank" in r) for r in rounds] == [True, False, True, True]  # eval_every 2 + last
    r1, r2, r3 = rounds[1:]
    assert r1["clients"] == [0, 1, 2, 3] and r1["aggregated"] == [0, 1, 2, 3] and not r1["skipped"]
    assert r1["train_loss"] == (0 + 1 + 2 + 3) / 4
    assert r1["passes"] == 1 + 2 + 3 + 4 and r1["examples"] == 2 * (1 + 2 + 3 + 4)
    down = sum(adapter_num_bytes(transport.sent[1][k]) for k in range(4))
    assert r1["bytes_down"] == down and r1["bytes_up"] == down  # prefixes back at their ranks

    reasons = {d["client"]: d["reason"] for d in r2["dropped"]}
    assert reasons[0] == "raised RuntimeError: scripted"
    assert reasons[1].startswith("timed out (no reply")
    assert reasons[2] == "timed out (10.0s > 5.0s)"
    assert r2["aggregated"] == [3] and r2["skipped"]
    assert all(torch.equal(states[1].adapter[n].A, states[0].adapter[n].A) for n in states[0].adapter)
    assert r2["bytes_up"] == sum(adapter_num_bytes(transport.sent[2][k]) for k in (2, 3))  # replies

    assert [d["client"] for d in r3["dropped"]] == [0] and r3["dropped"][0]["reason"].startswith("rejected")
    assert r3["aggregated"] == [1, 2, 3] and not r3["skipped"]

    after1 = _segment_average(
        state0.adapter, {k: _reply(k, 1, transport.sent[1][k]) for k in range(4)}, ranks
    )
    after3 = _segment_average(after1, {k: _reply(k, 3, transport.sent[3][k]) for k in (1, 2, 3)}, ranks)
    for name in after3:
        torch.testing.assert_close(states[0].adapter[name].A, after1[name].A, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final.adapter[name].A, after3[name].A, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final.adapter[name].B, after3[name].B, rtol=1e-6, atol=1e-6)
    # what a client is sent is the rank-r prefix of the global adapter of the previous round
    for name, pair in transport.sent[3][0].items():
        torch.testing.assert_close(pair.A, after1[name].A[:2], rtol=1e-6, atol=1e-6)
