"""Config validation and the command line (exit status 2 with one clear line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prelort.cli import main
from prelort.config import config_from_dict, dump_toml, load_config
from prelort.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"run": {"bogus": 1}}, "unknown key 'run.bogus'"),
        ({"nosuch": {}}, "unknown key 'nosuch'"),
        (
            {"clients": {"num_clients": 2, "ranks": [2, 3]}, "run": {"clients_per_round": 2}},
            "not in clients.levels",
        ),
        (
            {"run": {"clients_per_round": 9}, "clients": {"num_clients": 8}},
            "more than clients.num_clients",
        ),
        ({"run": {"rounds": "ten"}}, "run.rounds must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"lora": {"scaling": "huge"}}, "lora.scaling = 'huge' is not one of"),
        ({"run": {"method": "fedavg"}}, "unknown method"),
        ({"clients": {"levels": [4, 2]}}, "strictly increasing"),
    ],
)
def test_bad_config_is_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_overrides_and_resolved_config_roundtrip(tmp_path: Path) -> None:
    cfg = config_from_dict({}, ["run.rounds=3", 'run.method="segment"', "clients.levels=[2,4]"])
    assert cfg.run.rounds == 3 and cfg.run.method == "segment" and cfg.max_rank == 4
    p = tmp_path / "c.toml"
    from prelort.config import config_to_dict

    p.write_text(dump_toml(config_to_dict(cfg)))
    assert load_config(p) == cfg


def test_shipped_synthetic_config_loads() -> None:
    cfg = load_config(ROOT / "configs" / "synthetic.toml")
    assert cfg.workload.kind == "synthetic" and cfg.clients.num_clients >= 6


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--config", "configs/synthetic.toml", "--out", "X", "--set", "run.nope=1"],
        [
            "run",
            "--config",
            "configs/synthetic.toml",
            "--out",
            "X",
            "--set",
            "clients.ranks=[3,2,2,2,2,2,2,2]",
        ],
        [
            "run",
            "--config",
            "configs/synthetic.toml",
            "--out",
            "X",
            "--set",
            "run.clients_per_round=99",
        ],
        ["run", "--config", "configs/synthetic.toml", "--out", "X", "--set", "train.steps=1.5"],
        ["run", "--config", "missing.toml", "--out", "X"],
        [
            "compare",
            "--config",
            "configs/synthetic.toml",
            "--out",
            "X",
            "--methods",
            "prelort,nope",
        ],
        ["frobnicate"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    args = [a.replace("X", str(tmp_path / "out")) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "prelort.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prelort: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_run_and_compare(tmp_path: Path) -> None:
    small = [
        "--set",
        "run.rounds=2",
        "--set",
        "run.eval_every=1",
        "--set",
        "clients.num_clients=6",
        "--set",
        "clients.levels=[2,4,8]",
        "--set",
        "train.steps=2",
        "--set",
        "synthetic.hidden=12",
        "--set",
        "synthetic.test_examples=60",
    ]
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--config",
                str(ROOT / "configs/synthetic.toml"),
                "--out",
                str(out),
                "--quiet",
                *small,
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    for key in ("method", "seed", "ranks", "levels", "rounds", "final"):
        assert key in res
    assert set(res["final"]["per_rank"]) == {"2", "4", "8"}
    assert all({"round", "seconds", "bytes_up", "bytes_down"} <= set(r) for r in res["rounds"])
    assert load_config(out / "config.toml").run.rounds == 2

    cmp_out = tmp_path / "cmp"
    argv = [
        "compare",
        "--config",
        str(ROOT / "configs/synthetic.toml"),
        "--out",
        str(cmp_out),
        "--methods",
        "prelort,segment",
        "--seeds",
        "0,1",
        "--quiet",
        *small,
    ]
    assert main(argv) == 0
    summary = json.loads((cmp_out / "summary.json").read_text())
    assert set(summary["methods"]) == {"prelort", "segment"}
    assert len(summary["methods"]["prelort"]["per_rank"]["2"]["loss"]["values"]) == 2
    md = (cmp_out / "summary.md").read_text()
    assert "| prelort |" in md and "**" in md
    assert (cmp_out / "loss_vs_rank.png").stat().st_size > 1000
    assert (cmp_out / "loss_vs_round.png").is_file()

    # --report-only summarises finished runs only and runs nothing new
    (cmp_out / "summary.json").unlink()
    more = [a if a != "0,1" else "0,1,2" for a in argv]
    assert main([*more, "--report-only"]) == 0
    assert not (cmp_out / "runs" / "prelort-seed2").exists()
    again = json.loads((cmp_out / "summary.json").read_text())
    assert again["methods"]["prelort"]["per_rank"] == summary["methods"]["prelort"]["per_rank"]
    assert main([*[a if a != "prelort,segment" else "flora" for a in argv], "--report-only"]) == 2
