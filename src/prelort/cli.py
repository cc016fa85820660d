"""Command line: ``prelort run | compare | export | eval | config | methods``.

Bad input exits with status 2 and one line on stderr (docs/design.md §8); results already
written stay on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prelort.errors import UsageParser as _Parser
from prelort.errors import UserError
from prelort.errors import fail as _fail
from prelort.errors import os_error_line as _os_error_line

RUNTIMES = ("inprocess", "flower-simulation", "flower-deployment")
"""Where ``prelort run`` runs the rounds: this process, or a loopback Flower federation."""


def _parser() -> argparse.ArgumentParser:
    from prelort import __version__

    p = _Parser(prog="prelort", description=__doc__)
    p.add_argument("--version", action="version", version=f"prelort {__version__}", help="print the version")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated training and write DIR/results.json")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", help="output directory (checkpointed after every round)")
    run.add_argument(
        "--resume", metavar="DIR", help="continue the killed run in DIR from its last checkpoint"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")
    run.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="inprocess",
        help="inprocess (default), or a loopback Flower federation: flower-simulation (Flower's "
        "simulation engine on Ray) or flower-deployment (SuperLink + one SuperNode process per client)",
    )
    run.add_argument("--nodes", type=int, default=None, help="Flower runtimes: number of nodes (clients)")
    run.add_argument("--workers", type=int, default=1, help="flower-simulation: Ray ClientApp workers")
    run.add_argument("--tls", action="store_true", help="flower-deployment: TLS with a test CA")
    run.add_argument("--auth", action="store_true", help="flower-deployment: SuperNode authentication")
    run.add_argument("--timeout", type=float, default=3600, help="Flower runtimes: seconds for the whole run")

    cmp_ = sub.add_parser("compare", help="run several methods and seeds; write summary.{json,md} and plots")
    cmp_.add_argument("--config", required=True, help="TOML config file shared by every run")
    cmp_.add_argument(
        "--methods",
        default="prelort,segment,hetlora,flexlora,flora,fedit",
        help="comma-separated methods (`prelort methods` lists them; fedit-rN: FedIT at rank N)",
    )
    cmp_.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default: 0,1,2)")
    cmp_.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every run"
    )
    cmp_.add_argument("--out", required=True, help="output folder: runs/METHOD-seedS/, summary.{json,md}")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    cmp_.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: summarise the finished runs in OUT (a comparison still in progress)",
    )

    exp = sub.add_parser("export", help="write a rank-r PEFT adapter (or one for every level) from a run")
    exp.add_argument("--run", required=True, help="the --out folder of `prelort run`")
    which = exp.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", type=int, help="the rank r of the adapter to write")
    which.add_argument(
        "--all-levels",
        action="store_true",
        help="write the rank-R adapter, one subfolder r{l} per level and a model card README.md",
    )
    exp.add_argument("--out", required=True, help="adapter folder to write")

    ev = sub.add_parser("eval", help="evaluate a run's global adapter (or an exported adapter)")
    ev.add_argument("--run", required=True, help="the --out folder of `prelort run` (its config is used)")
    ev.add_argument("--ranks", default="", help="comma-separated ranks (default: every level)")
    ev.add_argument("--adapter", default="", help="a PEFT adapter folder to evaluate instead")
    ev.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's config"
    )
    ev.add_argument("--out", default="", help="also write the metrics to this JSON file")

    conf = sub.add_parser("config", help="print the resolved config as TOML (--keys: every key and default)")
    conf.add_argument("--config", help="TOML config file (default: the built-in defaults)")
    conf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    conf.add_argument(
        "--keys", action="store_true", help="list every key with its type, default and meaning instead"
    )

    sub.add_parser("methods", help="list the methods `run.method` takes, with their family and summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected operational errors are one line on stderr and exit status 2.

    Bad input (``UserError``), file-system errors (``OSError``: permissions, a file where a
    folder is needed, a full disk ...) and damaged JSON / safetensors / text files become
    ``prelort: error: <path>: <what>; <what to do>``; anything else is a bug and keeps its
    traceback.
    """
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "methods":
            return _cmd_methods()
    except UserError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_error_line(exc))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _fail(f"a damaged input file ({type(exc).__name__}: {exc}); check the files the command reads")
    except Exception as exc:
        st = sys.modules.get("safetensors")
        if st is not None and isinstance(exc, st.SafetensorError):
            return _fail(
                f"a damaged safetensors file ({exc}); check the model / adapter files the command reads"
            )
        raise
    return 2


def _log_stderr(message: str) -> None:
    print(f"prelort: {message}", file=sys.stderr)


def _check_out_dir(out: Path, flag: str) -> None:
    """``out`` can be a run folder: a folder, or creatable in a writable folder (before any work)."""
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


def _cmd_run(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.lock import run_lock

    if args.runtime != "inprocess":
        from prelort.commands.runtime import run_flower

        return run_flower(args)
    if args.nodes is not None or args.workers != 1 or args.tls or args.auth:
        raise UserError(
            "--nodes, --workers, --tls and --auth apply to the Flower runtimes (--runtime flower-...)"
        )
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
    # the numerics (torch, PEFT) are imported only once the config is known to be good
    from prelort.commands.compare import execute_run
    from prelort.federation.checkpoint import CHECKPOINT_DIR
    from prelort.reporting import per_rank_table
    from prelort.workloads import build_workload

    if args.resume and _finished_round(out) == cfg.run.rounds:  # read only: not even a lock file
        print(f"{out}: already finished ({cfg.run.rounds} rounds); nothing to do, results unchanged")
        return 0
    with run_lock(out, log=_log_stderr):  # one run per folder, until this process ends
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
    from prelort.commands.compare import run_comparison
    from prelort.lock import run_lock

    out = Path(args.out)
    _check_out_dir(out, "--out")
    methods = _parse_list(args.methods, "methods")
    try:
        seeds = [int(s) for s in _parse_list(args.seeds, "seeds")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    # --report-only reads finished results and writes the summary atomically: no lock
    with contextlib.nullcontext() if args.report_only else run_lock(out, log=_log_stderr):
        run_comparison(
            args.config,
            args.set,
            methods,
            seeds,
            out,
            report_only=args.report_only,
            progress=not args.quiet,
            console=_console(args.quiet),
            log=_log_stderr,
        )
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
    """``base_model_name_or_path`` of an export: the hub id of a built-in alias, else ``llm.model``."""
    if cfg.workload.kind != "llm":
        return None
    from prelort.adapters.export import base_model_id

    return base_model_id(str(cfg.llm.model))


def _cmd_export(args: argparse.Namespace) -> int:
    from prelort.adapters import export_peft_adapter
    from prelort.federation.plan import build_plan

    if args.all_levels:
        return _export_all_levels(args)
    cfg, adapter, delta = _run_artifacts(args.run)
    _refuse_base_delta(args.run, cfg, delta)
    if not 0 < args.rank <= cfg.max_rank:
        raise UserError(
            f"--rank {args.rank} outside 1..{cfg.max_rank} (the run's levels: {cfg.clients.levels})"
        )
    plan = build_plan(cfg)
    rule = plan.make_rule()
    if rule.fold(adapter, args.rank) is not None:
        raise UserError(
            f"--rank {args.rank}: a rank-{args.rank} client of a {cfg.run.method} run holds the full model, "
            f"part of it folded into the base weights, which a rank-{args.rank} LoRA adapter cannot carry; "
            f"export --rank {cfg.max_rank} (the whole model) or use `prelort eval --run`"
        )
    rank_r = rule.downlink(adapter, args.rank)
    out = export_peft_adapter(
        rank_r,
        plan.scaling(args.rank),
        args.out,
        base_model_name_or_path=_base_model_path(cfg),
        target_modules=cfg.lora.target_modules or None,
    )
    print(f"wrote PEFT adapter (rank {args.rank}) to {out}")
    return 0


def _refuse_base_delta(run: str, cfg: Any, delta: Any) -> None:
    """A run with a base-weight delta cannot be exported as a LoRA adapter."""
    if delta is not None:
        raise UserError(
            f"{run}: a {cfg.run.method} run merges its updates into the base weights "
            "(base_delta.safetensors), which a LoRA adapter cannot carry; use `prelort eval --run` instead"
        )


def _export_all_levels(args: argparse.Namespace) -> int:
    """``export --all-levels``: the rank-R adapter in OUT, one PEFT adapter per level in OUT/r{l},
    and a model card OUT/README.md with the run's final per-rank metrics."""
    from prelort.commands.export import export_run_levels

    out = Path(args.out)
    _check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; choose a new or an empty folder")
    cfg, adapter, delta = _run_artifacts(args.run)
    _refuse_base_delta(args.run, cfg, delta)
    levels = export_run_levels(cfg, adapter, out, base_model=_base_model_path(cfg), run_dir=Path(args.run))
    print(
        f"wrote the rank-{cfg.max_rank} PEFT adapter, {', '.join(f'r{lv}/' for lv in levels)} "
        f"and README.md to {out}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from prelort.config import load_config
    from prelort.federation.core import ServerState
    from prelort.federation.plan import build_plan
    from prelort.federation.simulator import build_nested, evaluate_per_rank
    from prelort.reporting.files import write_json
    from prelort.workloads import build_workload

    if args.out:
        _check_out_file(Path(args.out), "--out")
    peft_files = _read_peft_adapter(Path(args.adapter)) if args.adapter else None
    cfg, adapter, delta = _run_artifacts(args.run)
    if args.set:
        cfg = load_config(Path(args.run) / "config.toml", args.set)
    workload = build_workload(cfg)
    if args.adapter:
        assert peft_files is not None
        model = _load_peft_adapter(Path(args.adapter), *peft_files, workload.build_model()).eval()
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
        rule = build_plan(cfg).make_rule()
        state = ServerState(round=-1, adapter=adapter, client_ranks=())
        metrics = evaluate_per_rank(nested, rule, state, levels, workload, merged=delta)
    print(json.dumps(metrics, indent=2))
    if args.out:
        write_json(args.out, metrics)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """``prelort config``: the resolved config as TOML, or (``--keys``) every key documented."""
    from prelort.config import config_to_dict, dump_toml, load_config

    if args.keys:
        from prelort.config_doc import describe_keys

        if args.config or args.set:
            raise UserError("--keys lists the keys and their defaults; drop --config/--set")
        print(describe_keys(), end="")
        return 0
    cfg = load_config(args.config, args.set)
    print(dump_toml(config_to_dict(cfg)), end="")
    return 0


def _cmd_methods() -> int:
    """``prelort methods``: every method of ``run.method`` with its family and summary."""
    from prelort.federation.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, spec in METHODS.items():
        print(f"{name:<{width}}  {spec.family:<12}  {spec.summary}")
    print(f"{'fedit-rN':<{width}}  {'homogeneous':<12}  FedIT oracle: every client at level N")
    return 0


def _check_out_file(path: Path, flag: str) -> None:
    """``path`` can be written as a file (checked before any work)."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path such as {path / 'metrics.json'}")
    _check_out_dir(path.parent, flag)


# prelort.adapters.peft_io (torch, PEFT) is imported only when `eval --adapter` needs it
def _read_peft_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from prelort.adapters.peft_io import read_peft_adapter

    return read_peft_adapter(adapter_dir)


def _load_peft_adapter(adapter_dir: Path, conf: dict[str, Any], tensors: dict[str, Any], model: Any) -> Any:
    from prelort.adapters.peft_io import load_peft_adapter

    return load_peft_adapter(adapter_dir, conf, tensors, model)


if __name__ == "__main__":
    raise SystemExit(main())
