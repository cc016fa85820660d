"""Reliability: checkpoint/resume (real SIGKILL), damaged checkpoints, faulty clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.adapters import LoRAPair, load_adapter
from prelort.aggregation import RULES, ClientUpdate, aggregate
from prelort.federation import run_simulation
from prelort.federation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from prelort.federation.core import ClientResult, client_update
from prelort.workloads.synthetic import SyntheticWorkload

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.rounds=6",
    "run.eval_every=2",
    "clients.num_clients=6",
    "run.clients_per_round=3",
    "clients.levels=[2,4,8]",
    "train.steps=3",
    "synthetic.hidden=12",
    "synthetic.test_examples=60",
]


def _cfg(extra: list[str] | None = None):
    from prelort.config import load_config

    return load_config(ROOT / "configs" / "synthetic.toml", [*SMALL, *(extra or [])])


def _wl(cfg):
    return SyntheticWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "prelort.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _final(run: Path) -> tuple[dict, dict]:
    res = json.loads((run / "results.json").read_text())
    return res, load_adapter(run / "global_adapter.safetensors")


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    sets = [a for s in [*SMALL, "run.rounds=8", "train.steps=12"] for a in ("--set", s)]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    base = ["run", "--config", "configs/synthetic.toml", "--quiet", *sets]
    assert _cli(*base, "--out", str(ref)).wait(timeout=300) == 0

    proc = _cli(*base, "--out", str(killed))
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "round-000003"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # mid-round: rounds take ~1 s, checkpoints are instants
    proc.wait()
    assert not (killed / "results.json").exists()

    resumed = _cli("run", "--resume", str(killed), "--quiet")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    (ref_res, ref_ad), (res, ad) = _final(ref), _final(killed)
    assert res["final"] == ref_res["final"]
    assert [r.get("per_rank") for r in res["rounds"]] == [r.get("per_rank") for r in ref_res["rounds"]]
    for name in ref_ad:
        assert torch.equal(ad[name].A, ref_ad[name].A) and torch.equal(ad[name].B, ref_ad[name].B)


@pytest.mark.parametrize("method", ["flora", "hetlora"])  # per-round randomness, pruned ranks
def test_resume_in_process_after_checkpoint_equals_uninterrupted(tmp_path: Path, method: str) -> None:
    cfg = _cfg([f'run.method="{method}"'])
    full = run_simulation(cfg, _wl(cfg))
    saved: dict[int, tuple] = {}
    run_simulation(cfg, _wl(cfg), on_state=lambda s, r: saved.setdefault(s.round, (s, [dict(x) for x in r])))
    save_checkpoint(tmp_path, *saved[3], cfg)
    resumed = run_simulation(cfg, _wl(cfg), resume=load_checkpoint(tmp_path, cfg))
    assert resumed["final"] == full["final"] and resumed["final_ranks"] == full["final_ranks"]


def test_truncated_checkpoint_falls_back_then_errors(tmp_path: Path) -> None:
    cfg = _cfg()
    states: list = []
    run_simulation(cfg, _wl(cfg), on_state=lambda s, r: states.append((s, list(r))))
    save_checkpoint(tmp_path, *states[1], cfg)
    save_checkpoint(tmp_path, *states[2], cfg)
    newest = tmp_path / "checkpoints" / "round-000003" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    logged: list[str] = []
    state, _ = load_checkpoint(tmp_path, cfg, log=logged.append)
    assert state.round == 2 and logged and "round-000003" in logged[0]
    older = tmp_path / "checkpoints" / "round-000002" / "state.json"
    older.write_text(older.read_text()[:-20])
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path, cfg)


def test_checkpoint_from_another_configuration_is_refused(tmp_path: Path) -> None:
    cfg = _cfg()
    states: list = []
    run_simulation(cfg, _wl(cfg), on_state=lambda s, r: states.append((s, list(r))))
    save_checkpoint(tmp_path, *states[0], cfg)
    with pytest.raises(CheckpointError, match="different configuration"):
        load_checkpoint(tmp_path, _cfg(["train.lr=0.5"]))


def test_cli_resume_errors_are_one_line(tmp_path: Path) -> None:
    proc = _cli("run", "--resume", str(tmp_path / "nothing"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "nothing to resume" in err


# -- faulty clients ------------------------------------------------------------------------------
def _faulty(kind: str, victim: int = 1):
    def client_fn(nested, received, *, client_id, round_, plan, workload) -> ClientResult:
        res = client_update(
            nested, received, client_id=client_id, round_=round_, plan=plan, workload=workload
        )
        if client_id != victim:
            return res
        u = res.update
        if kind == "raise":
            raise RuntimeError("device lost")
        if kind == "hang":
            time.sleep(3.0)
            return res
        if kind == "nan":
            name = next(iter(u.adapter))
            bad = dict(u.adapter)
            bad[name] = LoRAPair(torch.full_like(u.adapter[name].A, float("nan")), u.adapter[name].B)
            return replace(res, update=replace(u, adapter=bad))
        if kind == "shape":
            bad = {n: LoRAPair(p.A[:, :-1], p.B) for n, p in u.adapter.items()}
            return replace(res, update=replace(u, adapter=bad))
        if kind == "rank":  # claims more rank than it was sent / has
            r = u.rank * 2
            bad = {
                n: LoRAPair(torch.zeros(r, p.A.shape[1]), torch.zeros(p.B.shape[0], r))
                for n, p in u.adapter.items()
            }
            return replace(res, update=ClientUpdate(bad, r, u.num_examples, u.client_id))
        if kind == "norm":
            return replace(
                res, update=replace(u, adapter={n: LoRAPair(p.A * 1e6, p.B) for n, p in u.adapter.items()})
            )
        raise AssertionError(kind)

    return client_fn


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("raise", "raised RuntimeError: device lost"),
        ("hang", "timed out"),
        ("nan", "NaN or Inf"),
        ("shape", "shapes"),
        ("rank", "above the client's capacity"),
        ("norm", "above the bound"),
    ],
)
def test_faulty_client_is_dropped_and_run_finishes(kind: str, reason: str) -> None:
    extra = ["run.clients_per_round=6", "run.rounds=2", "run.max_update_norm=1e4"]
    if kind == "hang":  # a healthy one-step client takes milliseconds; the victim sleeps 3 s
        extra += ["run.client_timeout=2.0", "train.steps=1"]
    cfg = _cfg(extra)
    res = run_simulation(cfg, _wl(cfg), client_fn=_faulty(kind))
    for rec in res["rounds"][1:]:
        assert [d["client"] for d in rec["dropped"]] == [1]
        assert reason in rec["dropped"][0]["reason"]
        assert 1 not in rec["aggregated"] and len(rec["aggregated"]) == 5
    for metrics in res["final"]["per_rank"].values():
        assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_too_few_valid_updates_skips_the_round() -> None:
    cfg = _cfg(["run.clients_per_round=2", "run.min_clients=2", "run.rounds=2", "clients.num_clients=2"])

    def always_fail(*args, **kwargs):
        raise RuntimeError("offline")

    res = run_simulation(cfg, _wl(cfg), client_fn=always_fail)
    assert all(r["skipped"] for r in res["rounds"][1:])
    assert res["final"]["per_rank"] == res["rounds"][0]["per_rank"]  # global kept


# -- property-based: every rule -----------------------------------------------------------------
@st.composite
def _round(draw):
    R = draw(st.sampled_from([4, 8]))
    n_in, n_out = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    k = draw(st.integers(1, 5))
    ranks = draw(st.lists(st.sampled_from([r for r in (1, 2, 4, 8) if r <= R]), min_size=k, max_size=k))
    sizes = draw(st.lists(st.integers(1, 50), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**16))
    return R, n_in, n_out, ranks, sizes, seed


@settings(max_examples=40, deadline=None)
@given(_round(), st.sampled_from(sorted(RULES)), st.randoms(use_true_random=False))
def test_rules_shapes_finiteness_and_permutation_invariance(case, rule, rnd) -> None:
    R, n_in, n_out, ranks, sizes, seed = case
    if rule == "fedit":
        ranks = [ranks[0]] * len(ranks)
    g = torch.Generator().manual_seed(seed)
    glob = {"m": LoRAPair(torch.randn(R, n_in, generator=g), torch.randn(n_out, R, generator=g))}
    ups = [
        ClientUpdate(
            {"m": LoRAPair(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))}, r, n, i
        )
        for i, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]
    perm = list(ups)
    rnd.shuffle(perm)
    a = aggregate(rule, glob, ups, generator=torch.Generator().manual_seed(0))
    b = aggregate(rule, glob, perm, generator=torch.Generator().manual_seed(0))
    for res in (a, b):
        assert res.adapter["m"].A.shape == (R, n_in) and res.adapter["m"].B.shape == (n_out, R)
        assert torch.isfinite(res.adapter["m"].A).all() and torch.isfinite(res.adapter["m"].B).all()
    if rule in ("flora", "florist"):  # merged into the base: the adapter restarts at B = 0
        assert a.base_delta is not None and b.base_delta is not None
        torch.testing.assert_close(a.base_delta["m"], b.base_delta["m"], rtol=1e-4, atol=1e-5)
    else:
        da = a.adapter["m"].B.double() @ a.adapter["m"].A.double()
        db = b.adapter["m"].B.double() @ b.adapter["m"].A.double()
        torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-6)
