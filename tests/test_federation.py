"""The simulator and the shared client/server steps on the synthetic workload."""

from __future__ import annotations

import pytest
import torch

from prelort.adapters import adapter_num_bytes
from prelort.config import config_from_dict
from prelort.federation import METHODS, client_update, run_simulation
from prelort.federation.core import initial_state
from prelort.federation.plan import assign_ranks, build_plan, sample_clients
from prelort.federation.simulator import build_nested
from prelort.workloads.synthetic import SyntheticWorkload

SMALL = {
    "run": {"rounds": 3, "clients_per_round": 3, "eval_every": 1},
    "clients": {"num_clients": 6, "levels": [2, 4, 8]},
    "train": {"steps": 3, "batch_size": 16, "lr": 0.01},
    "synthetic": {
        "d_in": 8,
        "hidden": 12,
        "d_out": 4,
        "teacher_rank": 8,
        "min_examples": 20,
        "max_examples": 60,
        "test_examples": 60,
    },
}


def _cfg(**run: object):
    data = {k: dict(v) for k, v in SMALL.items()}
    data["run"].update(run)
    return config_from_dict(data)


def _workload(cfg):
    return SyntheticWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)


def test_rank_assignment() -> None:
    cfg = _cfg()
    assert assign_ranks(cfg) == [2, 4, 8, 2, 4, 8]
    heavy = config_from_dict(
        {
            **SMALL,
            "clients": {**SMALL["clients"], "rank_distribution": "heavy-tail", "num_clients": 200},
            "run": {"clients_per_round": 3},
        }
    )
    ranks = assign_ranks(heavy)
    assert ranks.count(2) > ranks.count(4) > ranks.count(8) > 0
    assert assign_ranks(heavy) == ranks  # seeded


def test_client_sampling_is_seeded_and_without_replacement() -> None:
    a = sample_clients(0, 1, 10, 4)
    assert a == sample_clients(0, 1, 10, 4) and len(set(a)) == 4
    assert any(sample_clients(0, t, 10, 4) != a for t in range(2, 6))


def test_client_receives_and_returns_only_its_prefix() -> None:
    cfg = _cfg(method="prelort")
    wl = _workload(cfg)
    plan = build_plan(cfg)
    nested = build_nested(plan, wl)
    rule = plan.make_rule()
    state = initial_state(plan, nested.shapes(), plan.make_rule())
    received = rule.downlink(state.adapter, 4)
    assert all(p.A.shape[0] == 4 and p.B.shape[1] == 4 for p in received.values())
    res = client_update(nested, received, client_id=1, round_=1, plan=plan, workload=wl)
    assert res.update.rank == 4 and res.update.num_examples == wl.num_examples(1)
    for name, pair in res.update.adapter.items():
        assert pair.A.shape == (4, received[name].A.shape[1])
        assert pair.B.shape == (received[name].B.shape[0], 4)
    assert adapter_num_bytes(res.update.adapter) == adapter_num_bytes(received)


def test_simulation_bytes_are_exactly_the_prefixes() -> None:
    cfg = _cfg(method="prelort")
    res = run_simulation(cfg, _workload(cfg))
    shapes = {"fc1": (12, 8), "fc2": (12, 12)}
    per_rank_bytes = {r: sum(r * (o + i) * 4 for o, i in shapes.values()) for r in (2, 4, 8)}
    ranks = res["ranks"]
    for rec in res["rounds"][1:]:
        expect = sum(per_rank_bytes[ranks[k]] for k in rec["clients"])
        assert rec["bytes_up"] == expect and rec["bytes_down"] == expect


def test_simulation_is_reproducible_and_learns() -> None:
    cfg = _cfg(method="prelort", rounds=4)
    a = run_simulation(cfg, _workload(cfg))
    b = run_simulation(cfg, _workload(cfg))
    assert a["final"] == b["final"]
    assert a["rounds"][-1]["per_rank"]["8"]["loss"] < a["rounds"][0]["per_rank"]["8"]["loss"]
    c = run_simulation(_cfg(method="prelort", rounds=4, seed=1), _workload(cfg))
    assert c["final"] != a["final"]


class CountingWorkload(SyntheticWorkload):
    builds = 0

    def build_model(self) -> torch.nn.Module:
        type(self).builds += 1
        return super().build_model()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_with_one_base_model(method: str) -> None:
    cfg = _cfg(method=method)
    wl = CountingWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)
    builds_before = CountingWorkload.builds
    res = run_simulation(cfg, wl)
    assert CountingWorkload.builds - builds_before == 1  # one model in memory, not one per client
    assert set(res["final"]["per_rank"]) == {"2", "4", "8"}
    for metrics in res["final"]["per_rank"].values():
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2, 3]
    if method.startswith("fedit"):
        assert len(set(res["effective_ranks"])) == 1


def test_flora_downloads_grow_with_the_stack() -> None:
    cfg = _cfg(method="flora")
    res = run_simulation(cfg, _workload(cfg))
    r1, r2 = res["rounds"][1], res["rounds"][2]
    assert r2["bytes_down"] > r1["bytes_down"]  # round 2 also carries round 1's stack


def test_hetlora_self_pruning_lowers_ranks_over_rounds() -> None:
    data = {k: dict(v) for k, v in SMALL.items()}
    data["run"].update(method="hetlora", rounds=6, clients_per_round=6)
    data["hetlora"] = {"gamma": 0.5, "lam": 5.0, "min_rank": 1}
    cfg = config_from_dict(data)
    res = run_simulation(cfg, _workload(cfg))
    assert all(f <= r for f, r in zip(res["final_ranks"], res["ranks"], strict=True))
    assert any(f < r for f, r in zip(res["final_ranks"], res["ranks"], strict=True))
