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


def execute_run(cfg: Any, workload: Any, out: Path, *, progress: bool, console: Any) -> dict[str, Any]:
    """Run (or resume) one simulation in ``out`` with a checkpoint after every round."""
    from prelort.config import config_to_dict, dump_toml
    from prelort.federation.artifacts import save_global
    from prelort.federation.checkpoint import load_checkpoint, save_checkpoint
    from prelort.federation.simulator import run_simulation
    from prelort.reporting import atomic_write_text, write_results

    resume = load_checkpoint(out, cfg, log=console.print)
    if resume is not None:
        console.print(f"resuming {out} after round {resume[0].round}")
    else:
        atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))

    def on_state(state: Any, rounds: list[dict[str, Any]]) -> None:
        save_checkpoint(out, state, rounds, cfg)
        save_global(out, state)

    results = run_simulation(cfg, workload, progress=progress, on_state=on_state, resume=resume)
    write_results(out, results, cfg)
    return results


def _cmd_run(args: argparse.Namespace) -> int:
    from prelort.config import load_config
    from prelort.federation.checkpoint import CHECKPOINT_DIR
    from prelort.reporting import per_rank_table
    from prelort.workloads import build_workload

    console = _console(args.quiet)
    if args.resume:
        if args.config or args.set or (args.out and Path(args.out) != Path(args.resume)):
            raise UserError("--resume DIR takes the run's own config.toml; drop --config/--set/--out")
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise UserError(f"{out}: nothing to resume (no config.toml); start it with --config and --out")
        cfg = load_config(out / "config.toml")
    else:
        if not args.config or not args.out:
            raise UserError("run needs --config FILE and --out DIR (or --resume DIR)")
        out = Path(args.out)
        if (out / CHECKPOINT_DIR).is_dir():
            raise UserError(
                f"{out} already holds a run; continue it with --resume {out} or choose another --out"
            )
        cfg = load_config(args.config, args.set)
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
    from prelort.config import load_config
    from prelort.federation.methods import METHODS
    from prelort.reporting import summarise, summary_markdown
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
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    out = Path(args.out)
    base_cfg = load_config(args.config, args.set)
    console = _console(args.quiet)
    runs: list[dict[str, Any]] = []
    workload = build_workload(base_cfg)
    for seed in seeds:
        for method in methods:
            cfg = load_config(args.config, [*args.set, f'run.method="{method}"', f"run.seed={seed}"])
            run_dir = out / "runs" / f"{method}-seed{seed}"
            existing = run_dir / "results.json"
            if existing.is_file():  # finished earlier: reuse, nothing computed is lost
                runs.append(json.loads(existing.read_text(encoding="utf-8")))
                console.print(f"reusing {existing}")
                continue
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
    from prelort.federation.core import make_rule, make_scaling
    from prelort.federation.methods import get_method

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
    rule = make_rule(cfg, get_method(cfg.run.method))
    rank_r = rule.downlink(adapter, args.rank)
    out = export_peft_adapter(
        rank_r, make_scaling(cfg)(args.rank), args.out, base_model_name_or_path=_base_model_path(cfg)
    )
    print(f"wrote PEFT adapter (rank {args.rank}) to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from prelort.config import load_config
    from prelort.federation.core import ServerState, make_rule
    from prelort.federation.methods import get_method
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
        rule = make_rule(cfg, get_method(cfg.run.method))
        state = ServerState(round=-1, adapter=adapter, client_ranks=())
        metrics = evaluate_per_rank(nested, rule, state, levels, workload)
    print(json.dumps(metrics, indent=2))
    if args.out:
        write_json(args.out, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
