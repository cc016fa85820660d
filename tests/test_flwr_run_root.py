"""``flwr run .`` at the repository root (issue #20 item 1).

The root ``pyproject.toml`` is a Flower app: with Flower's default ``local`` connection,
``flwr run .`` starts Flower's managed local SuperLink (simulation engine, 2 virtual
SuperNodes), and PreLort's ServerApp runs the built-in synthetic workload with
``clients.num_clients`` following the federation. The final adapter must equal the
in-process simulator's for the same config, every process of the run must end with it, and
the SuperLink that Flower keeps for the next run must stop with ``prelort.flower.process_tree``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomllib
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flower_support import all_dead, cmdline
from prelort.config import Config, load_config
from prelort.federation import run_simulation
from prelort.federation.artifacts import load_global
from prelort.flower import process_tree
from prelort.flower.run_config import (
    APP_KEYS,
    app_config_toml,
    flat_defaults,
    flat_overrides,
    run_config_defaults,
)
from prelort.flower.settings import settings_from_run_config
from prelort.processes import pid_alive
from prelort.workloads import build_workload

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _program(pid: int) -> str:
    """The script a Python process runs (``flower-superlink``, ...), or its executable."""
    words = cmdline(pid).split()
    return words[1 if len(words) > 1 and "python" in words[0] else 0].rsplit("/", 1)[-1] if words else ""


@pytest.mark.integration
@pytest.mark.skipif(not FLWR.exists(), reason="the flwr CLI is not installed beside this Python")
def test_flwr_run_at_the_root_equals_the_simulator_and_leaves_no_process(tmp_path: Path) -> None:
    home = (tmp_path / "fh").absolute()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # no network call to PyPI from the CLI or SuperLink
        "OMP_NUM_THREADS": "1",
        "PATH": f"{FLWR.parent}{os.pathsep}{env.get('PATH', '')}",
    }
    seen: dict[int, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in process_tree.processes_under(tmp_path):
                seen.setdefault(pid, cmdline(pid))
            stop.wait(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run(
            [str(FLWR), "run", ".", "--stream", "--run-config", f'out="{out}"'],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log
        assert (out / "results.json").is_file(), log
        # every process of the run (flwr-simulation, Ray, the apps) ends with it; Flower keeps
        # only its local SuperLink and that SuperLink's SuperExec for the next `flwr run`
        end = time.monotonic() + 30
        while True:
            kept = process_tree.local_superlinks(home)
            kept += [c for pid in kept for c in process_tree.descendants(pid)]
            names = {_program(p) for p in kept if pid_alive(p)}
            left = [p for p in seen if p not in kept and pid_alive(p)]
            if (not left and names == {"flower-superlink", "flower-superexec"}) or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert not left, [seen[p] for p in left]
        assert names == {"flower-superlink", "flower-superexec"}, [cmdline(p) for p in kept]
        names = " | ".join(seen.values())
        assert "flwr-simulation" in names and "raylet" in names, names  # the engine ran, watched
        assert process_tree.local_superlinks(home), "Flower's local SuperLink was not found"
    finally:
        stop.set()
        watcher.join()
        still = process_tree.stop_local_superlinks(home)
    assert not still
    assert not all_dead(process_tree.processes_under(tmp_path)), "processes left running"
    assert not [p for p in seen if pid_alive(p)], "processes left running"

    res = json.loads((out / "results.json").read_text())
    assert res["ranks"] == [2, 4] and len(res["engine"]["nodes"]) == 2
    # the in-process simulator on the config `flwr run .` means: the built-in synthetic
    # workload with one client per SuperNode (Flower's default: 2), both sampled every round
    cfg: Config = load_config(None, ["clients.num_clients=2", "run.clients_per_round=2"])
    states = []
    ref = run_simulation(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
    adapter, _ = load_global(out)
    assert set(adapter) == set(states[-1].adapter)
    for name, pair in adapter.items():
        torch.testing.assert_close(pair.A, states[-1].adapter[name].A, atol=1e-6, rtol=0)
        torch.testing.assert_close(pair.B, states[-1].adapter[name].B, atol=1e-6, rtol=0)
    for level, metrics in ref["final"]["per_rank"].items():
        assert res["final"]["per_rank"][level] == pytest.approx(metrics, rel=1e-5), level
    shutil.rmtree(home, ignore_errors=True)


# -- the run-config keys: declared in both app pyprojects, applied as prelort run --set ----------
def _declared(path: Path) -> dict[str, object]:
    conf = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]

    def flat(d: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    return flat(conf)


@pytest.mark.parametrize("path", [ROOT / "pyproject.toml", ROOT / "src/prelort/flower/app/pyproject.toml"])
def test_both_app_pyprojects_declare_every_config_key(path: Path) -> None:
    declared = _declared(path)
    assert declared == run_config_defaults()
    assert app_config_toml() in path.read_text()  # regenerate: python -m prelort.flower.run_config
    # spot checks against the config dataclasses' defaults, written out here
    assert declared["run.rounds"] == 20 and declared["train.lr"] == 0.001
    assert declared["llm.model"] == "smollm2-135m" and declared["clients.levels"] == "[2, 4, 8, 16]"
    assert declared["clients.ranks"] == "" and declared["clients.num_clients"] == 0
    assert set(APP_KEYS) <= set(declared)


def test_root_app_components_and_uv_exclusions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "prelort.flower.server_app:app",
        "clientapp": "prelort.flower.client_app:app",
    }
    # Flower's runtime `uv sync` must install nothing: every dependency and extra is excluded
    deps = list(project["project"]["dependencies"])
    deps += [d for extra in project["project"]["optional-dependencies"].values() for d in extra]
    names = set()
    for dep in deps:
        name = dep.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    assert set(project["tool"]["uv"]["exclude-dependencies"]) == names


def test_flat_keys_apply_only_where_they_differ_from_the_builtin_default(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text('[run]\nrounds = 7\nmethod = "segment"\n[clients]\nnum_clients = 5\n')
    given = run_config_defaults() | {
        "config": str(base),
        "train.lr": 0.05,  # differs: applied
        "run.rounds": 20,  # the built-in default: the base file's 7 stands
        "clients.levels": "[2, 8]",
        "clients.ranks": "",  # unset
        "train.max_grad_norm": "1.5",  # a key without default, as TOML text
        "run.tensorboard": False,
        "set": "run.seed=3",
    }
    assert flat_overrides(given) == ("clients.levels=[2, 8]", "train.lr=0.05", "train.max_grad_norm=1.5")
    settings = settings_from_run_config(given)
    cfg, follow = settings.resolve()
    assert (cfg.run.rounds, cfg.run.method, cfg.run.seed) == (7, "segment", 3)
    assert cfg.train.lr == 0.05 and cfg.clients.levels == [2, 8] and cfg.train.max_grad_norm == 1.5
    assert cfg.clients.num_clients == 5 and not follow  # the base file names it
    # without the base file nothing names num_clients: it follows the federation
    _, follow = settings_from_run_config(run_config_defaults()).resolve()
    assert follow
    _, follow = settings_from_run_config(run_config_defaults() | {"clients.num_clients": 5}).resolve()
    assert not follow


def test_flat_defaults_are_the_config_defaults() -> None:
    defaults = flat_defaults()
    fresh = Config()
    assert defaults["run.method"] == fresh.run.method and defaults["train.steps"] == fresh.train.steps
    assert defaults["lora.alpha"] == fresh.lora.alpha and defaults["run.report_to"] == "[]"
    assert defaults["llm.fields"] == "{}" and defaults["privacy.clip"] == ""
    # nothing differs from the built-in defaults, so nothing is applied
    assert flat_overrides(run_config_defaults()) == ()
