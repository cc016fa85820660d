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
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", help="output directory (checkpointed after every round)")
    run.add_argument(
        "--resume", metavar="DIR", help="continue the killed run in DIR from its last checkpoint"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")

    cmp_ = sub.add_parser("compare", help="run several methods and seeds; write summary.{json,md} and plots")
    cmp_.add_argument("--config", required=True)
    cmp_.add_argument("--methods", default="prelort,segment,hetlora,flexlora,flora,fedit")
    cmp_.add_argument("--seeds", default="0,1,2")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cmp_.add_argument("--out", required=True)
    cmp_.add_argument("--quiet", action="store_true")

    exp = sub.add_parser("export", help="write a rank-r PEFT adapter from a finished run")
    exp.add_argument("--run", required=True, help="the --out folder of `prelort run`")
    exp.add_argument("--rank", required=True, type=int)
    exp.add_argument("--out", required=True, help="adapter folder to write")

    ev = sub.add_parser("eval", help="evaluate a run's global adapter (or an exported adapter)")
    ev.add_argument("--run", required=True, help="the --out folder of `prelort run` (its config is used)")
    ev.add_argument("--ranks", default="", help="comma-separated ranks (default: every level)")
    ev.add_argument("--adapter", default="", help="a PEFT adapter folder to evaluate instead")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--out", default="", help="also write the metrics to this JSON file")
    return p


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, status 2 (argparse's own convention)
        raise _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected operational errors are one line on stderr and exit status 2.

    Bad input (``UserError``), file-system errors (``OSError``: permissions, a file where a
    folder is needed, a full disk ...) and damaged JSON / safetensors / text files become
    ``prelort: error: <path>: <what>; <what to do>``; anything else is a bug and keeps its
    traceback.
    """
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
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "eval":
            return _cmd_eval(args)
    except (_UsageError, UserError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_error_line(exc))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _fail(f"a damaged input file ({type(exc).__name__}: {exc}); check the files the command reads")
    except Exception as exc:
        st = sys.modules.get("safetensors")
        if st is not None and isinstance(exc, st.SafetensorError):
            return _fail(f"a damaged safetensors file ({exc}); check the model / adapter files the command reads")
        raise
    return 2


def _fail(message: str) -> int:
    """Print ``message`` as the one ``prelort: error:`` line on stderr; exit status 2."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"prelort: error: {one_line}", file=sys.stderr)
    return 2


def _os_error_line(exc: OSError) -> str:
    """``<path>: <what>; <what to do>`` for a file-system error."""
    import errno

    permissions = "check its permissions or choose another path"
    full = "free some disk space or choose another path"
    hints = {
        errno.EACCES: permissions,
        errno.EPERM: permissions,
        errno.EROFS: "the file system is read-only; choose another path",
        errno.ENOENT: "check that the path exists",
        errno.EEXIST: "a file is in the way; remove it or choose another path",
        errno.ENOTDIR: "a file is in the way where a folder is needed; choose another path",
        errno.EISDIR: "it is a folder; give a file path",
        errno.ENOSPC: full,
        errno.EDQUOT: full,
    }
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = hints.get(exc.errno or 0, "check the path and try again")
    if exc.filename is None:
        return f"{what}; {hint}"
    return f"{exc.filename}: {what}; {hint}"


def _log_stderr(message: str) -> None:
    print(f"prelort: {message}", file=sys.stderr)


def _check_out_dir(out: Path, flag: str) -> None:
    """``out`` can be a run folder: a folder, or creatable in a writable folder (before any work)."""
    import os

    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder; choose a folder path")
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{flag} {out}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {base} is not writable; fix its permissions or choose another path")


def _finished_round(out: Path) -> int | None:
    """The last round recorded in ``out/results.json`` (None: no readable results)."""
    try:
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
        return int(res["rounds"][-1]["round"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=False, quiet=quiet)


def execute_run(cfg: Any, workload: Any, out: Path, *, progress: bool, console: Any) -> dict[str, Any]:
    """Run (or resume) one in-process simulation in ``out`` with a checkpoint after every round."""
    from prelort.federation.driver import run_in_folder
    from prelort.federation.simulator import make_driver

    driver = make_driver(cfg, workload, progress=progress)
    return run_in_folder(driver, out, log_line=console.print)


def _cmd_run(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.federation.checkpoint import CHECKPOINT_DIR
    from prelort.reporting import per_rank_table
    from prelort.workloads import build_workload

    from prelort.lock import run_lock

    console = _console(args.quiet)
    if args.resume:
        if args.config or args.set or (args.out and Path(args.out) != Path(args.resume)):
            raise UserError("--resume DIR takes the run's own config.toml; drop --config/--set/--out")
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise UserError(f"{out}: nothing to resume (no config.toml); start it with --config and --out")
        _check_out_dir(out, "--resume")
        cfg = load_config(out / "config.toml")
    else:
        if not args.config or not args.out:
            raise UserError("run needs --config FILE and --out DIR (or --resume DIR)")
        out = Path(args.out)
        _check_out_dir(out, "--out")
        cfg = load_config(args.config, args.set)
    with run_lock(out, log=_log_stderr):  # one run per folder, until this process ends
        if args.resume and _finished_round(out) == cfg.run.rounds:
            print(f"{out}: already finished ({cfg.run.rounds} rounds); nothing to do, results unchanged")
            return 0
        if not args.resume and (out / CHECKPOINT_DIR).is_dir():
            raise UserError(
                f"{out} already holds a run; continue it with --resume {out} or choose another --out"
            )
        workload = build_workload(cfg)
        results = execute_run(cfg, workload, out, progress=not args.quiet, console=console)
    console.print(per_rank_table(results))
    console.print(f"wrote {out / 'results.json'}")
    return 0


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    return items


def _cmd_compare(args: argparse.Namespace) -> int:
    """``prelort compare``, holding OUT's lock for the whole command (one writer per folder)."""
    from prelort.lock import run_lock

    out = Path(args.out)
    _check_out_dir(out, "--out")
    with run_lock(out, log=_log_stderr):
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.federation.methods import METHODS, oracle_level
    from prelort.reporting import summarise, summary_markdown
    from prelort.reporting.files import atomic_write_text, write_json
    from prelort.reporting.summary import plot_summary
    from prelort.workloads import build_workload

    methods = _parse_list(args.methods, "methods")
    unknown = [m for m in methods if m not in METHODS and oracle_level(m) is None]
    if unknown:
        raise UserError(
            f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)} or fedit-rN"
        )
    try:
        seeds = [int(s) for s in _parse_list(args.seeds, "seeds")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    out = Path(args.out)
    load_config(args.config, args.set)  # a bad config fails before any run starts
    console = _console(args.quiet)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        workload = None  # built on first need: the data split follows the run seed
        for method in methods:
            cfg = load_config(args.config, [*args.set, f'run.method="{method}"', f"run.seed={seed}"])
            run_dir = out / "runs" / f"{method}-seed{seed}"
            existing = run_dir / "results.json"
            if existing.is_file():  # finished earlier: reuse, nothing computed is lost
                runs.append(json.loads(existing.read_text(encoding="utf-8")))
                console.print(f"reusing {existing}")
                continue
            if workload is None:
                workload = build_workload(cfg)
            runs.append(execute_run(cfg, workload, run_dir, progress=not args.quiet, console=console))
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


def _run_artifacts(run_dir: str) -> tuple[Any, Any, Any]:
    from prelort.config import load_config
    from prelort.federation.artifacts import load_global

    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise UserError(f"{run}: no config.toml; pass the --out folder of a finished `prelort run`")
    cfg = load_config(run / "config.toml")
    try:
        adapter, delta = load_global(run)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg, adapter, delta


def _base_model_path(cfg: Any) -> str | None:
    if cfg.workload.kind != "llm":
        return None
    from prelort.models import BUILTIN_MODELS, ensure_cached

    if cfg.llm.model in BUILTIN_MODELS:
        return str(ensure_cached(cfg.llm.model, cfg.llm.cache_dir or None))
    return str(cfg.llm.model)


def _cmd_export(args: argparse.Namespace) -> int:
    from prelort.adapters import export_peft_adapter
    from prelort.federation.plan import build_plan

    cfg, adapter, delta = _run_artifacts(args.run)
    if delta is not None:
        raise UserError(
            f"{args.run}: a {cfg.run.method} run merges its updates into the base weights "
            "(base_delta.safetensors), which a LoRA adapter cannot carry; use `prelort eval --run` instead"
        )
    if not 0 < args.rank <= cfg.max_rank:
        raise UserError(
            f"--rank {args.rank} outside 1..{cfg.max_rank} (the run's levels: {cfg.clients.levels})"
        )
    plan = build_plan(cfg)
    rank_r = plan.make_rule().downlink(adapter, args.rank)
    out = export_peft_adapter(
        rank_r, plan.scaling(args.rank), args.out, base_model_name_or_path=_base_model_path(cfg)
    )
    print(f"wrote PEFT adapter (rank {args.rank}) to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from prelort.config import load_config
    from prelort.federation.core import ServerState
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import build_nested, evaluate_per_rank
    from prelort.reporting.files import write_json
    from prelort.workloads import build_workload

    cfg, adapter, delta = _run_artifacts(args.run)
    if args.set:
        cfg = load_config(Path(args.run) / "config.toml", args.set)
    workload = build_workload(cfg)
    if args.adapter:
        from peft import PeftModel

        adapter_dir = Path(args.adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(workload.build_model(), str(adapter_dir)).eval()
        with torch.no_grad():
            metrics: dict[str, Any] = {"adapter": workload.evaluate(model)}
    else:
        levels = cfg.clients.levels
        if args.ranks:
            try:
                levels = [int(r) for r in _parse_list(args.ranks, "ranks")]
            except ValueError:
                raise UserError(f"--ranks {args.ranks!r}: expected integers like 2,4,8") from None
            if any(not 0 < r <= cfg.max_rank for r in levels):
                raise UserError(f"--ranks {args.ranks}: every rank must be in 1..{cfg.max_rank}")
        nested = build_nested(cfg, workload)
        if delta is not None:
            nested.set_base_delta(delta)
        rule = build_plan(cfg).make_rule()
        state = ServerState(round=-1, adapter=adapter, client_ranks=())
        metrics = evaluate_per_rank(nested, rule, state, levels, workload)
    print(json.dumps(metrics, indent=2))
    if args.out:
        write_json(args.out, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
