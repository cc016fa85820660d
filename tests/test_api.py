"""The Python API: ``prelort.run`` and ``prelort.compare`` do what the commands do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prelort
from prelort.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "synthetic.toml"
SMALL = [
    "run.rounds=2",
    "run.eval_every=1",
    "clients.num_clients=3",
    "run.clients_per_round=3",
    "clients.levels=[2, 4]",
    "train.steps=2",
    "synthetic.hidden=8",
    "synthetic.test_examples=20",
]


def test_run_in_memory_equals_run_in_a_folder_and_the_cli(tmp_path: Path) -> None:
    from prelort.adapters import load_adapter
    from prelort.cli import main

    mem = prelort.run(CONFIG, overrides=SMALL)
    folder = prelort.run(CONFIG, overrides=SMALL, out=tmp_path / "api")
    args = ["run", "--config", str(CONFIG), "--out", str(tmp_path / "cli"), "--quiet"]
    assert main([*args, *[a for s in SMALL for a in ("--set", s)]]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert mem["final"] == folder["final"] == cli["final"] and mem["method"] == "prelort"
    a = load_adapter(tmp_path / "api" / "global_adapter.safetensors")
    b = load_adapter(tmp_path / "cli" / "global_adapter.safetensors")
    assert all(torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B) for n in a)


def test_compare_writes_the_summary_and_reuses_finished_runs(tmp_path: Path) -> None:
    summary = prelort.compare(CONFIG, methods=["segment", "fedit"], seeds=[0], out=tmp_path, overrides=SMALL)
    assert (tmp_path / "summary.md").is_file() and (
        tmp_path / "runs" / "segment-seed0" / "results.json"
    ).is_file()
    assert {"segment", "fedit"} <= set(json.dumps(summary).split('"'))
    stamp = (tmp_path / "runs" / "segment-seed0" / "results.json").stat().st_mtime_ns
    again = prelort.compare(CONFIG, methods=["segment"], seeds=[0], out=tmp_path, overrides=SMALL)
    assert (tmp_path / "runs" / "segment-seed0" / "results.json").stat().st_mtime_ns == stamp  # reused
    assert "segment" in json.dumps(again)


def test_bad_input_raises_instead_of_exiting() -> None:
    with pytest.raises(ConfigError, match=r"run\.rounds"):
        prelort.run(CONFIG, overrides=["run.rounds=0"])


def test_the_readme_python_cell_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    cell = section[section.index("```python") + len("```python") : section.index("```\n", 10)]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "synthetic.toml").write_text(CONFIG.read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(cell, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "run.clients_per_round = 40 is more than clients.num_clients = 8; lower it or add clients"
    )
    assert (tmp_path / "runs" / "s" / "results.json").is_file()
    assert (tmp_path / "runs" / "cmp" / "base-config.toml").is_file()
    assert (tmp_path / "runs" / "cmp" / "runs" / "flexlora-seed1" / "results.json").is_file()


def test_a_config_built_in_code_is_validated_by_every_entry_point(tmp_path: Path) -> None:
    from prelort.config import Config, RunSection
    from prelort.federation.plan import build_plan

    bad = Config(run=RunSection(clients_per_round=40))
    with pytest.raises(ConfigError, match="clients_per_round = 40"):
        prelort.run(bad)
    with pytest.raises(ConfigError, match="clients_per_round = 40"):
        prelort.compare(bad, methods=["segment"], seeds=[0], out=tmp_path)
    with pytest.raises(ConfigError, match="clients_per_round = 40"):
        build_plan(bad)  # what run_simulation and the Flower ServerApp start from
