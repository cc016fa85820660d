"""``prelort compare``: run every method x seed in its own folder, then summarise them all."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelort.errors import UserError

if TYPE_CHECKING:
    from prelort.config import Config
    from prelort.federation.workload import Workload


def execute_run(
    cfg: Config, workload: Workload, out: Path, *, progress: bool, console: Any
) -> dict[str, Any]:
    """Run (or resume) one in-process simulation in ``out`` with a checkpoint after every round;
    its results (``out/results.json``)."""
    from prelort.federation.run_folder import run_in_folder
    from prelort.federation.simulator import make_driver

    driver = make_driver(cfg, workload, progress=progress)
    return run_in_folder(driver, out, log_line=console.print)


def run_comparison(
    config: str | Path,
    overrides: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    report_only: bool,
    progress: bool,
    console: Any,
    log: Callable[[str], Any],
) -> None:
    """Run ``methods`` x ``seeds`` of ``config`` in ``out/runs/METHOD-seedS`` and write
    ``out/summary.{json,md}`` and the plots.

    An unknown method (``prelort methods`` lists them; ``fedit-rN`` is FedIT at rank N) and
    a finished run of another configuration are a ``UserError``; a finished run of the same
    configuration is reused; ``report_only`` runs nothing and summarises the finished runs.
    Each run holds its folder's lock (``log`` hears of a stale one taken over); ``progress``
    shows a progress bar per run; ``console`` (a ``rich`` console) prints the summary table
    and what was written.
    """
    from prelort.config import config_to_dict, load_config, same_config
    from prelort.federation.methods import METHODS, oracle_level, unused_keys
    from prelort.lock import run_lock

    load_config(config, overrides)  # a bad config fails before any run starts (plugins imported)
    unknown = [m for m in methods if m not in METHODS and oracle_level(m) is None]
    if unknown:
        raise UserError(
            f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)} or fedit-rN"
        )
    from prelort.reporting import summarise, summary_markdown
    from prelort.reporting.files import atomic_write_text, write_json
    from prelort.reporting.plots import plot_summary
    from prelort.workloads import build_workload

    runs: list[dict[str, Any]] = []
    for seed in seeds:
        workload = None  # built on first need: the data split follows the run seed
        for method in methods:
            cfg = load_config(config, [*overrides, f'run.method="{method}"', f"run.seed={seed}"])
            run_dir = out / "runs" / f"{method}-seed{seed}"
            existing = run_dir / "results.json"
            if report_only and not existing.is_file():
                console.print(f"not finished yet: {run_dir}")
                continue
            if existing.is_file():  # finished earlier: reuse, nothing computed is lost
                done = json.loads(existing.read_text(encoding="utf-8"))
                if not same_config(done.get("config"), config_to_dict(cfg), unused_keys(cfg.run.method)):
                    raise UserError(
                        f"{existing} was run with another configuration; move it away or choose another --out"
                    )
                runs.append(done)
                console.print(f"reusing {existing}")
                continue
            if workload is None:
                workload = build_workload(cfg)
            with run_lock(run_dir, log=log):  # a `run --resume` of this folder must wait
                runs.append(execute_run(cfg, workload, run_dir, progress=progress, console=console))
    if not runs:
        raise UserError(f"{out}: no finished run of these methods and seeds to summarise")
    summary = summarise(runs)
    summary["config"] = str(config)
    summary["overrides"] = list(overrides)
    write_json(out / "summary.json", summary)
    md = summary_markdown(summary, title=f"PreLort comparison: {Path(config).name}")
    atomic_write_text(out / "summary.md", md)
    plots = plot_summary(summary, runs, out)
    console.print(md)
    console.print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {len(plots)} plots")
