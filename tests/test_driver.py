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


def test_mlflow_run_holds_the_config_and_per_rank_metrics(tmp_path: Path) -> None:
    """``run.report_to = ["mlflow"]``: one MLflow run in the local store OUT/mlflow.db whose
    metric histories are the round records of results.json and whose params are the config."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    assert main([*_args(out, 'run.report_to=["mlflow"]'), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("prelort")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["run.rounds"] == "2" and run.data.params["run.method"] == "prelort"
    for lv in ("2", "4"):
        history = client.get_metric_history(run.info.run_id, f"r{lv}/rel_loss")
        want = [r["per_rank"][lv]["rel_loss"] for r in results["rounds"]]
        assert [m.step for m in history] == [0, 1, 2]
        assert [m.value for m in history] == pytest.approx(want, rel=1e-6)
    passes = client.get_metric_history(run.info.run_id, "round/passes")
    assert [m.value for m in passes] == [r["passes"] for r in results["rounds"]]


def test_report_to_is_checked_when_the_config_is_read(tmp_path: Path) -> None:
    from prelort.config import config_from_dict
    from prelort.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run\.report_to\[0\] = 'wandb' is not one of"):
        config_from_dict({"run": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError, match="lists a target twice"):
        config_from_dict({"run": {"report_to": ["mlflow", "mlflow"]}})
    both = config_from_dict({"run": {"report_to": ["mlflow"], "tensorboard": True}})
    assert both.run.reports() == ("tensorboard", "mlflow")


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
