"""Command line: ``prelort run | compare``.

Bad input exits with status 2 and one line on stderr (DESIGN.md §3); results already
written stay on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prelort.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prelort", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated training and write DIR/results.json")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")

    cmp_ = sub.add_parser(
        "compare", help="run several methods and seeds; write summary.{json,md} and plots"
    )
    cmp_.add_argument("--config", required=True)
    cmp_.add_argument("--methods", default="prelort,segment,hetlora,flexlora,flora,fedit")
    cmp_.add_argument("--seeds", default="0,1,2")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cmp_.add_argument("--out", required=True)
    cmp_.add_argument("--quiet", action="store_true")
    return p


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, status 2 (argparse's own convention)
        raise _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    parser.__class__ = _Parser
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sp in getattr(action, "choices", {}).values():
            sp.__class__ = _Parser
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            return _cmd_compare(args)
    except _UsageError as exc:
        print(f"prelort: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"prelort: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=False, quiet=quiet)


def _cmd_run(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.federation.simulator import run_simulation
    from prelort.reporting import per_rank_table, write_results
    from prelort.workloads import build_workload

    cfg = load_config(args.config, args.set)
    workload = build_workload(cfg)
    results = run_simulation(cfg, workload, progress=not args.quiet)
    write_results(args.out, results, cfg)
    console = _console(args.quiet)
    console.print(per_rank_table(results))
    console.print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    return items


def _cmd_compare(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.federation.methods import METHODS
    from prelort.federation.simulator import run_simulation
    from prelort.reporting import summarise, summary_markdown, write_results
    from prelort.reporting.files import atomic_write_text, write_json
    from prelort.reporting.summary import plot_summary
    from prelort.workloads import build_workload

    methods = _parse_list(args.methods, "methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in _parse_list(args.seeds, "seeds")]
    except ValueError:
        raise UserError(
            f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    out = Path(args.out)
    base_cfg = load_config(args.config, args.set)
    console = _console(args.quiet)
    runs: list[dict[str, Any]] = []
    workload = build_workload(base_cfg)
    for seed in seeds:
        for method in methods:
            cfg = load_config(
                args.config, [*args.set, f'run.method="{method}"', f"run.seed={seed}"]
            )
            run_dir = out / "runs" / f"{method}-seed{seed}"
            existing = run_dir / "results.json"
            if existing.is_file():  # finished earlier: reuse, nothing computed is lost
                runs.append(json.loads(existing.read_text(encoding="utf-8")))
                console.print(f"reusing {existing}")
                continue
            results = run_simulation(cfg, workload, progress=not args.quiet)
            write_results(run_dir, results, cfg)
            runs.append(results)
    summary = summarise(runs)
    summary["config"] = str(args.config)
    summary["overrides"] = list(args.set)
    write_json(out / "summary.json", summary)
    md = summary_markdown(summary, title=f"PreLort comparison: {Path(args.config).name}")
    atomic_write_text(out / "summary.md", md)
    plots = plot_summary(summary, runs, out)
    console.print(md)
    console.print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
