"""The round driver's outputs a person watches: TensorBoard events and progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prelort.cli import main

TINY = [
    "run.rounds=2",
    "run.eval_every=1",
    "clients.num_clients=4",
    "clients.levels=[2, 4]",
    "run.clients_per_round=2",
    "train.steps=3",
    "synthetic.d_in=6",
    "synthetic.hidden=8",
    "synthetic.d_out=3",
    "synthetic.teacher_rank=4",
    "synthetic.test_examples=20",
]


def _args(out: Path, *extra: str) -> list[str]:
    args = ["run", "--config", "configs/synthetic.toml", "--out", str(out)]
    for s in [*TINY, *extra]:
        args += ["--set", s]
    return args


def test_tensorboard_events_hold_the_per_rank_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*_args(out, "run.tensorboard=true"), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for lv in ("2", "4"):
        events = acc.Scalars(f"r{lv}/rel_loss")
        want = [r["per_rank"][lv]["rel_loss"] for r in results["rounds"]]
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6)
    passes = [e.value for e in acc.Scalars("round/passes")]
    assert passes == [r["passes"] for r in results["rounds"]]


def test_progress_shows_clients_steps_and_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "round 1:" in out and "round 2:" in out and "r2 rel_loss=" in out


def test_progress_view_sees_every_client_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from prelort.config import load_config
    from prelort.federation.simulator import make_driver
    from prelort.reporting.progress import RoundProgress
    from prelort.workloads import build_workload

    seen: dict[str, list] = {"clients": [], "steps": [], "levels": []}
    monkeypatch.setattr(RoundProgress, "client_started", lambda self, i, k, r: seen["clients"].append((k, r)))
    monkeypatch.setattr(RoundProgress, "step", lambda self: seen["steps"].append(1))
    monkeypatch.setattr(RoundProgress, "evaluating", lambda self, lv: seen["levels"].append(lv))
    cfg = load_config("configs/synthetic.toml", [*TINY, 'train.nested_mode="all"'])
    d = make_driver(cfg, build_workload(cfg), progress=True)
    state, rounds = d.start()
    d.run(state, rounds)
    sampled = [(k, d.plan.ranks[k]) for t in (1, 2) for k in d.plan.sample(t)]
    assert seen["clients"] == sampled
    assert len(seen["steps"]) == sum(d.plan.local_steps(r) for _, r in sampled)
    assert seen["levels"] == [2, 4, 2, 4]
