"""Flower's simulation engine: ``python -m prelort.flower.local --engine simulation``.

A ``--simulation`` SuperLink on a free port, ``flwr run`` with 3 virtual SuperNodes and one
Ray ClientApp worker: the run must end with the in-process simulator's global adapter and
metrics, build the model once for all six train messages, and leave no process (SuperLink,
SuperExec, ``flwr-simulation``, Ray) and no Ray temp folder behind.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flower_support import SMALL_SET, SYNTHETIC, all_dead, cmdline, reference_run, small_config
from prelort.errors import UserError
from prelort.federation.artifacts import load_global
from prelort.flower import local


@pytest.mark.integration
def test_simulation_engine_matches_the_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 rounds of prelort on 3 virtual SuperNodes (ranks 2, 4, 8 from the config), 1 Ray CPU."""
    out = tmp_path / "run"
    work = out / "flower"
    # every process of the federation (Ray's included) carries FLWR_HOME under `work`: watch them
    seen: dict[int, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in local.processes_under(work):
                seen.setdefault(pid, cmdline(pid))
            stop.wait(0.25)

    ray_dirs: list[Path] = []
    close = local.LocalFederation.close

    def close_and_record(self: local.LocalFederation, grace: float = 10.0) -> None:
        if self.ray_tmp is not None:
            ray_dirs.append(self.ray_tmp)
        for s in self.processes:
            for pid in [s.proc.pid, *local.descendants(s.proc.pid)]:
                seen.setdefault(pid, cmdline(pid))
        close(self, grace)

    monkeypatch.setattr(local.LocalFederation, "close", close_and_record)
    args = ["--engine", "simulation", "--nodes", "3", "--ranks", "2,4,8", "--workers", "1"]
    args += ["--config", str(SYNTHETIC), "--out", str(out), "--timeout", "200"]
    for s in SMALL_SET:
        args += ["--set", s]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rc = local.main(args)
    finally:
        stop.set()
        watcher.join()
    assert rc == 0, capsys.readouterr().err
    assert "rel_loss" in capsys.readouterr().out

    ref, ref_state = reference_run(small_config())
    adapter, _ = load_global(out)
    assert set(adapter) == set(ref_state.adapter)
    for name, pair in adapter.items():
        torch.testing.assert_close(pair.A, ref_state.adapter[name].A, atol=1e-6, rtol=0)
        torch.testing.assert_close(pair.B, ref_state.adapter[name].B, atol=1e-6, rtol=0)
    res = json.loads((out / "results.json").read_text())
    # the same results.json as `prelort run`, plus the engine's own fields
    assert set(ref) <= set(res) and res["engine"]["name"] == "flower"
    for level, metrics in ref["final"]["per_rank"].items():
        assert res["final"]["per_rank"][level] == pytest.approx(metrics, rel=1e-5), level
    assert res["ranks"] == [2, 4, 8] and len(res["engine"]["nodes"]) == 3
    for mine, theirs in zip(res["rounds"], ref["rounds"], strict=True):
        for key in ("round", "bytes_up", "bytes_down", "clients", "aggregated", "skipped", "passes"):
            assert mine.get(key) == theirs.get(key), key
    # one Ray worker served all 6 train messages with one model build
    assert res["engine"]["workers"] == {"client_processes": 1, "model_builds": 1}

    names = " | ".join(seen.values())
    assert "flwr-simulation" in names and "raylet" in names, names  # Ray ran, and was watched
    assert not all_dead(list(seen)), "processes left running"
    assert not local.processes_under(work), "processes left running"
    assert ray_dirs and not any(d.exists() for d in ray_dirs), "Ray's temp folder left behind"


def test_simulation_engine_refuses_tls_and_bad_workers(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--engine", "simulation", "--config", str(SYNTHETIC), "--out", "/nonexistent/never-written"]
    assert local.main([*base, "--tls"]) == 2
    assert "--tls and --auth apply to --engine deployment only" in capsys.readouterr().err
    assert local.main([*base, "--workers", "0"]) == 2
    assert "--workers must be a positive integer" in capsys.readouterr().err
    with pytest.raises(UserError, match="deployment engine only"):
        local.LocalFederation(Path("/nonexistent"), [2], auth=True, engine="simulation")
