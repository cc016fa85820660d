"""A new method in one file: a rule with its own server state, registered from outside the package.

``ServerMomentum`` is server-side heavy-ball momentum on the global adapter (FedAvgM; Hsu,
Qi and Brown 2019, arXiv 1909.06335, Alg. 1): with the segment-wise average G' of the
round's updates, m_t = beta m_{t-1} + (G' - G_{t-1}) and G_t = G_{t-1} + m_t, factor by
factor. Its momentum buffer is rule state (``RuleState``): the driver, the Flower transport,
the ClientApp, the checkpoint and the CLI carry it without knowing it exists. This module is
also the plugin a config names (``run.plugins = ["test_rule_plugin"]``), so every process
that reads the config (the CLI, Flower's ServerApp and its Ray ClientApp workers) registers it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation import RULES
from prelort.aggregation.base import AggregationResult, AggregationRule, ClientUpdate, RuleState, register
from prelort.aggregation.segment import segment_average
from prelort.federation.methods import METHODS, MethodSpec, register_method

BETA = 0.5


class ServerMomentum(AggregationRule):
    """Heavy-ball momentum on the segment-wise average (FedAvgM, Hsu et al. 2019, Alg. 1)."""

    name = "server-momentum"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        return AggregationResult(segment_average(global_adapter, updates))

    def init_state(self, global_adapter: Adapter) -> RuleState:
        return {
            f"m/{name}/{f}": torch.zeros_like(getattr(pair, f))
            for name, pair in global_adapter.items()
            for f in ("A", "B")
        }

    def update(
        self, global_adapter: Adapter, state: RuleState, updates: Sequence[ClientUpdate]
    ) -> tuple[Adapter, RuleState, AggregationResult]:
        result = self.aggregate(global_adapter, updates)
        new_state: RuleState = {}
        adapter: Adapter = {}
        for name, pair in global_adapter.items():
            mom = {}
            for f in ("A", "B"):
                key = f"m/{name}/{f}"
                step = getattr(result.adapter[name], f) - getattr(pair, f)
                mom[f] = new_state[key] = BETA * state[key] + step
            adapter[name] = LoRAPair(pair.A + mom["A"], pair.B + mom["B"])
        return adapter, new_state, result


if "server-momentum" not in RULES:  # imported once by pytest and once more as a plugin: register once
    register("server-momentum")(ServerMomentum)
if "momentum" not in METHODS:
    register_method(MethodSpec("momentum", "server-momentum", summary="segment-wise + server momentum"))

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SETS = [
    "run.plugins=['test_rule_plugin']",
    "run.method='momentum'",
    "run.rounds=8",
    "run.eval_every=2",
    "clients.num_clients=6",
    "run.clients_per_round=3",
    "clients.levels=[2,4,8]",
    "train.steps=12",
    "synthetic.hidden=12",
    "synthetic.test_examples=60",
]


def _pair(g: torch.Generator, r: int) -> LoRAPair:
    return LoRAPair(torch.randn(r, 5, generator=g), torch.randn(4, r, generator=g))


def test_momentum_state_follows_the_heavy_ball_recursion() -> None:
    """Two rounds through ``server_update`` against FedAvgM computed here: full-rank clients,
    so the segment-wise average is the data-weighted mean of the factors."""
    from prelort.federation.core import ServerState, server_update

    g = torch.Generator().manual_seed(3)
    rule = RULES["server-momentum"]()
    g0 = {"m": _pair(g, 4)}
    state = ServerState(round=0, adapter=g0, client_ranks=(4, 4), rule_state=rule.init_state(g0))
    expect_A, expect_B = g0["m"].A.clone(), g0["m"].B.clone()
    mA, mB = torch.zeros_like(expect_A), torch.zeros_like(expect_B)
    for _ in range(2):
        ups = [ClientUpdate({"m": _pair(g, 4)}, 4, n, k) for k, n in enumerate((10, 30))]
        avg_A = (10 * ups[0].adapter["m"].A + 30 * ups[1].adapter["m"].A) / 40
        avg_B = (10 * ups[0].adapter["m"].B + 30 * ups[1].adapter["m"].B) / 40
        mA, mB = BETA * mA + (avg_A - expect_A), BETA * mB + (avg_B - expect_B)
        expect_A, expect_B = expect_A + mA, expect_B + mB
        state, _ = server_update(state, rule, ups)
    torch.testing.assert_close(state.adapter["m"].A, expect_A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.adapter["m"].B, expect_B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.rule_state["m/m/A"], mA, rtol=1e-5, atol=1e-6)
    assert set(state.rule_state) == {"m/m/A", "m/m/B"}


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "prelort.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_plugin_method_killed_and_resumed_in_process_is_bit_identical(tmp_path: Path) -> None:
    """``prelort run`` of the plugin's method, SIGKILLed mid-run and resumed, ends with the
    bytes of an uninterrupted run; the checkpoint carries the momentum buffer."""
    from safetensors.torch import load_file

    from prelort.adapters import load_adapter

    sets = [a for s in SETS for a in ("--set", s)]
    base = ["run", "--config", "configs/synthetic.toml", "--quiet", *sets]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = _cli(*base, "--out", str(ref))
    assert done.wait(timeout=300) == 0, done.communicate()[1]

    proc = _cli(*base, "--out", str(killed))
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "round-000003"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    saved = load_file(killed / "checkpoints" / latest.read_text().strip() / "state.safetensors")
    momentum = [k for k in saved if k.startswith("rule/m/")]
    assert momentum and any(bool(saved[k].any()) for k in momentum)

    resumed = _cli("run", "--resume", str(killed), "--quiet")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = (
        load_adapter(ref / "global_adapter.safetensors"),
        load_adapter(killed / "global_adapter.safetensors"),
    )
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
    import json

    r1, r2 = (json.loads((p / "results.json").read_text()) for p in (ref, killed))
    assert r1["final"] == r2["final"] and r1["method"] == "momentum"


def test_plugin_method_differs_from_its_base_rule() -> None:
    """The momentum state is used: the same run with plain ``segment`` ends elsewhere."""
    from prelort.config import load_config
    from prelort.federation import run_simulation
    from prelort.federation.core import ServerState
    from prelort.workloads.synthetic import SyntheticWorkload

    finals: dict[str, ServerState] = {}
    for method in ("momentum", "segment"):
        cfg = load_config(
            ROOT / "configs" / "synthetic.toml", [*SETS, f"run.method='{method}'", "run.rounds=3"]
        )
        wl = SyntheticWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)
        run_simulation(cfg, wl, on_state=lambda s, _r, m=method: finals.__setitem__(m, s))
    a, b = finals["momentum"].adapter, finals["segment"].adapter
    assert any(not torch.allclose(a[n].B, b[n].B, atol=1e-4) for n in a)
    assert finals["segment"].rule_state == {} and finals["momentum"].rule_state


def _flower_config() -> tuple[Any, list[str]]:
    from flower_support import SMALL_SET, SYNTHETIC
    from prelort.flower import local

    sets = [*SMALL_SET, "run.plugins=['test_rule_plugin']", "run.method='momentum'", "run.rounds=3"]
    return local.resolve_config(str(SYNTHETIC), sets, 3, [2, 4, 8]), sets


def test_plugin_method_on_flowers_apps_crashes_and_resumes_bit_identically(
    tmp_path: Path, task_identity: None
) -> None:
    """Flower's ServerApp and ClientApp (over an in-memory grid): the rule state survives a
    SuperLink failure in round 3 and the restarted run ends with the uninterrupted one's bytes,
    which equal the in-process simulator's."""
    pytest.importorskip("flwr")
    from flower_support import reference_run
    from prelort.federation.artifacts import load_global
    from prelort.flower import client_app
    from prelort.flower.server_app import run_federation
    from prelort.flower.settings import RunSettings
    from test_flower import CrashingGrid, InMemoryGrid, _nodes

    cfg, _ = _flower_config()
    client_app._WORKERS.clear()
    full = run_federation(InMemoryGrid(_nodes([2, 4, 8])), cfg, RunSettings("", (), ""), tmp_path / "full")
    with pytest.raises(ConnectionError):
        run_federation(
            CrashingGrid(_nodes([2, 4, 8]), crash_at=3), cfg, RunSettings("", (), ""), tmp_path / "b"
        )
    resumed = run_federation(InMemoryGrid(_nodes([2, 4, 8])), cfg, RunSettings("", (), ""), tmp_path / "b")
    a, b = load_global(tmp_path / "full")[0], load_global(tmp_path / "b")[0]
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
    assert resumed["final"] == full["final"] and full["method"] == "momentum"
    _, ref_state = reference_run(cfg)
    for name in a:
        torch.testing.assert_close(a[name].A, ref_state.adapter[name].A, atol=1e-6, rtol=0)
        torch.testing.assert_close(a[name].B, ref_state.adapter[name].B, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_plugin_method_on_flowers_simulation_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prelort run --runtime flower-simulation``: the SuperLink, ServerApp and Ray ClientApp
    worker import the plugin from the config and end where the in-process simulator ends."""
    pytest.importorskip("ray")
    from flower_support import SYNTHETIC, reference_run
    from prelort.cli import main
    from prelort.federation.artifacts import load_global

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cfg, sets = _flower_config()
    out = tmp_path / "run"
    args = ["run", "--runtime", "flower-simulation", "--nodes", "3", "--workers", "1", "--quiet"]
    args += ["--config", str(SYNTHETIC), "--out", str(out), "--timeout", "200"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    ref, ref_state = reference_run(cfg)
    adapter, _ = load_global(out)
    for name, pair in adapter.items():
        torch.testing.assert_close(pair.A, ref_state.adapter[name].A, atol=1e-6, rtol=0)
        torch.testing.assert_close(pair.B, ref_state.adapter[name].B, atol=1e-6, rtol=0)
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "momentum" and res["engine"]["name"] == "flower"
    for level, metrics in ref["final"]["per_rank"].items():
        assert res["final"]["per_rank"][level] == pytest.approx(metrics, rel=1e-5), level


@pytest.mark.integration
def test_plugin_method_on_the_simulation_engine_killed_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    """``prelort run --runtime flower-simulation`` SIGTERMed (the launcher stops the whole
    federation) after a checkpoint, then started again with the same ``--out``: it resumes and
    ends with the bytes of an uninterrupted simulation-engine run."""
    pytest.importorskip("ray")
    from prelort.adapters import load_adapter

    sets = [*SETS, "run.rounds=6", "clients.num_clients=3", "train.steps=4"]
    args = ["run", "--runtime", "flower-simulation", "--nodes", "3", "--workers", "1", "--quiet"]
    args += ["--config", "configs/synthetic.toml", "--timeout", "300"]
    args += [a for s in sets for a in ("--set", s)]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = _cli(*args, "--out", str(ref))
    assert done.wait(timeout=400) == 0, done.communicate()[1]

    proc = _cli(*args, "--out", str(killed))
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "round-000002"):
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert not (killed / "results.json").exists()
    import json

    saved = json.loads((killed / "checkpoints" / latest.read_text().strip() / "state.json").read_text())

    again = _cli(*args, "--out", str(killed))
    _, err = again.communicate(timeout=400)
    assert again.returncode == 0, err
    rounds = json.loads((killed / "results.json").read_text())["rounds"]
    k = len(saved["rounds"])
    assert k >= 3 and rounds[:k] == saved["rounds"]  # resumed: the killed run's records (timings) kept
    a, b = (load_adapter(p / "global_adapter.safetensors") for p in (ref, killed))
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
