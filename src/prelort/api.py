"""The Python API of the two main commands: ``prelort.run`` and ``prelort.compare``.

    import prelort
    results = prelort.run("configs/synthetic.toml", overrides=["run.rounds=5"])
    summary = prelort.compare("configs/synthetic.toml", methods=["prelort", "flexlora"],
                              seeds=[0, 1], out="runs/cmp")

They do what ``prelort run`` / ``prelort compare`` do (same folders, checkpoints, resume and
reuse of finished runs) and return the ``results.json`` / ``summary.json`` content; bad input
raises ``prelort.errors.UserError`` (``ConfigError`` for a config) instead of exiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prelort.config import Config


def resolve(config: Config | str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The validated config of a TOML file (None: the defaults) or of a ``Config`` built in
    code, with ``overrides`` applied; ``ConfigError`` with one line when invalid."""
    from prelort.config import Config, config_from_dict, config_to_dict, load_config

    if isinstance(config, Config):  # built in code: validated and resolved as a file would be
        return config_from_dict(config_to_dict(config), overrides)
    return load_config(config, overrides)


def run(
    config: Config | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One federated training in this process; with ``out``, in that folder as ``prelort run
    --out`` (config.toml, a checkpoint per round, results.json; an interrupted run resumes),
    else in memory. ``config``: a TOML file (None: the defaults) or a ``Config``;
    ``overrides``: ``--set`` strings like ``"run.rounds=5"``."""
    from prelort.workloads import build_workload

    cfg = resolve(config, overrides)
    workload = build_workload(cfg)
    if out is None:
        from prelort.federation.simulator import run_simulation

        return run_simulation(cfg, workload, progress=progress)
    from rich.console import Console

    from prelort.commands.compare import execute_run
    from prelort.lock import run_lock

    folder = Path(out)
    with run_lock(folder):
        return execute_run(cfg, workload, folder, progress=progress, console=Console(quiet=not progress))


def compare(
    config: Config | str | Path,
    *,
    methods: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path,
    overrides: Sequence[str] = (),
    report_only: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """``methods`` x ``seeds`` in ``out/runs/METHOD-seedS`` (finished runs of the same config
    reused), then ``out/summary.{json,md}`` and the plots; returns the summary. A ``Config``
    built in code is validated, then saved as ``out/base-config.toml`` and compared from there."""
    import json

    from rich.console import Console

    from prelort.atomic_files import atomic_write_text
    from prelort.commands.compare import run_comparison
    from prelort.config import Config, config_to_dict, dump_toml
    from prelort.lock import run_lock

    folder = Path(out)
    if isinstance(config, Config):
        base = resolve(config)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "base-config.toml"
        atomic_write_text(config, dump_toml(config_to_dict(base)))
    with run_lock(folder):
        run_comparison(
            config,
            list(overrides),
            list(methods),
            [int(s) for s in seeds],
            folder,
            report_only=report_only,
            progress=progress,
            console=Console(quiet=not progress),
            log=lambda _msg: None,
        )
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return summary
