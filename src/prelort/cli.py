"""Command line: ``prelort run | compare | export | eval | config | methods``.

Bad input exits with status 2 and one line on stderr (docs/design.md §8); results already
written stay on disk.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prelort.errors import UserError


def _parser() -> argparse.ArgumentParser:
    from prelort import __version__

    p = argparse.ArgumentParser(prog="prelort", description=__doc__)
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
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "methods":
            return _cmd_methods()
    except (_UsageError, UserError) as exc:
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
    # the numerics (torch, PEFT) are imported only once the config is known to be good
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
    from prelort.lock import run_lock

    out = Path(args.out)
    _check_out_dir(out, "--out")
    if args.report_only:  # reads finished results and writes the summary atomically: no lock
        return _compare(args)
    with run_lock(out, log=_log_stderr):
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    from prelort.config import config_to_dict, load_config, same_config
    from prelort.federation.methods import METHODS, oracle_level, unused_keys
    from prelort.lock import run_lock

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
    from prelort.reporting import summarise, summary_markdown
    from prelort.reporting.files import atomic_write_text, write_json
    from prelort.reporting.summary import plot_summary
    from prelort.workloads import build_workload

    console = _console(args.quiet)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        workload = None  # built on first need: the data split follows the run seed
        for method in methods:
            cfg = load_config(args.config, [*args.set, f'run.method="{method}"', f"run.seed={seed}"])
            run_dir = out / "runs" / f"{method}-seed{seed}"
            existing = run_dir / "results.json"
            if args.report_only and not existing.is_file():
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
            with run_lock(run_dir, log=_log_stderr):  # a `run --resume` of this folder must wait
                runs.append(execute_run(cfg, workload, run_dir, progress=not args.quiet, console=console))
    if not runs:
        raise UserError(f"{out}: no finished run of these methods and seeds to summarise")
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


def _export_all_levels(args: argparse.Namespace) -> int:
    """``export --all-levels``: the rank-R adapter in OUT, one PEFT adapter per level in OUT/r{l},
    and a model card OUT/README.md with the run's final per-rank metrics."""
    from prelort.adapters.levels import export_all_levels, model_card, read_record
    from prelort.federation.methods import get_method
    from prelort.federation.plan import build_plan
    from prelort.reporting.files import atomic_write_text

    out = Path(args.out)
    _check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; choose a new or an empty folder")
    cfg, adapter, delta = _run_artifacts(args.run)
    if delta is not None:
        raise UserError(
            f"{args.run}: a {cfg.run.method} run merges its updates into the base weights "
            "(base_delta.safetensors), which a LoRA adapter cannot carry; use `prelort eval --run` instead"
        )
    plan = build_plan(cfg)
    rule = plan.make_rule()
    levels = sorted(cfg.clients.levels)
    R = cfg.max_rank
    folded = [lv for lv in levels if rule.fold(adapter, lv) is not None]
    if folded:
        raise UserError(
            f"--all-levels: a rank-{folded[0]} client of a {cfg.run.method} run holds the full model, "
            "part of it folded into the base weights, which a LoRA adapter cannot carry; "
            f"export --rank {R} (the whole model) or use `prelort eval --run`"
        )
    per_level = {lv: (rule.downlink(adapter, lv), plan.scaling(lv)) for lv in levels}
    base = _base_model_path(cfg)
    method = get_method(cfg.run.method)
    try:
        export_all_levels(
            rule.downlink(adapter, R),
            per_level,
            plan.scaling,
            out,
            base_model_name_or_path=base,
            target_modules=cfg.lora.target_modules or None,
            info={"method": cfg.run.method, "base_model": base},
        )
    except ValueError as exc:
        raise UserError(f"--all-levels: {exc}; export one rank at a time with --rank") from None
    try:
        results = json.loads((Path(args.run) / "results.json").read_text(encoding="utf-8"))
        per_rank = results["final"]["per_rank"]
    except (OSError, ValueError, KeyError, TypeError):
        per_rank = None
    notes = []
    if cfg.workload.kind == "llm":
        from prelort.models import BUILTIN_MODELS

        if cfg.llm.model in BUILTIN_MODELS:
            notes.append(
                f"The run used the built-in alias `{cfg.llm.model}` "
                f"({BUILTIN_MODELS[cfg.llm.model].description}), dequantised from GGUF: "
                "the metrics below are for those weights"
            )
    card = model_card(
        method=cfg.run.method,
        summary=method.summary,
        levels=levels,
        scaling=read_record(out)["scaling"],
        base_model=base,
        per_rank=per_rank,
        notes=[f"Method family: {method.family}", f"Rounds: {cfg.run.rounds}, seed {cfg.run.seed}", *notes],
    )
    atomic_write_text(out / "README.md", card)
    print(f"wrote the rank-{R} PEFT adapter, {', '.join(f'r{lv}/' for lv in levels)} and README.md to {out}")
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
        if delta is not None:
            nested.set_base_delta(delta)
        rule = build_plan(cfg).make_rule()
        state = ServerState(round=-1, adapter=adapter, client_ranks=(), base_delta=delta)
        metrics = evaluate_per_rank(nested, rule, state, levels, workload)
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


_PEFT_FIX = "export it again with `prelort export`"
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _check_out_file(path: Path, flag: str) -> None:
    """``path`` can be written as a file (checked before any work)."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path such as {path / 'metrics.json'}")
    _check_out_dir(path.parent, flag)


def _read_peft_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` and the weights of a PEFT LoRA adapter folder, checked for damage."""
    import math

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not adapter_dir.is_dir():
        raise UserError(f"--adapter {adapter_dir}: not a folder; pass a PEFT adapter folder")
    conf_path = adapter_dir / "adapter_config.json"
    if not conf_path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json); {_PEFT_FIX}")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{conf_path}: not valid JSON ({exc}); {_PEFT_FIX}") from None
    if not isinstance(conf, dict):
        raise UserError(f"{conf_path}: holds a {type(conf).__name__}, not an object; {_PEFT_FIX}")
    if conf.get("peft_type") != "LORA":
        raise UserError(f"{conf_path}: peft_type {conf.get('peft_type')!r} is not 'LORA'; {_PEFT_FIX}")
    r, alpha, targets = conf.get("r"), conf.get("lora_alpha"), conf.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{conf_path}: r = {r!r} is not a positive integer; {_PEFT_FIX}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise UserError(f"{conf_path}: lora_alpha = {alpha!r} is not a finite number; {_PEFT_FIX}")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise UserError(f"{conf_path}: target_modules = {targets!r:.60} is not a list of names; {_PEFT_FIX}")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        other = (
            " (adapter_model.bin is not read: pickles can run code)"
            if (adapter_dir / "adapter_model.bin").is_file()
            else ""
        )
        raise UserError(
            f"{adapter_dir}: no adapter_model.safetensors, the adapter's weights{other}; {_PEFT_FIX}"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: damaged weights file ({exc}); {_PEFT_FIX}") from None
    return conf, tensors


def _load_peft_adapter(adapter_dir: Path, conf: dict[str, Any], tensors: dict[str, Any], model: Any) -> Any:
    """``model`` with the adapter of ``adapter_dir`` (PEFT), after checking that it fits ``model``.

    A tensor for a module the model lacks, shapes that do not fit, NaN/Inf, a module with
    only one factor, or targets that do not match the weights is one ``UserError`` line
    (PEFT would raise, or silently leave a module untrained).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    weights = adapter_dir / "adapter_model.safetensors"
    modules = dict(model.named_modules())
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise UserError(f"{weights}: unexpected tensor {key!r} (not a LoRA A/B weight); {_PEFT_FIX}")
        name, which = m.groups()
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UserError(
                f"{weights}: tensor {key!r} is for module {name!r}, which the run's model has no linear "
                "layer for; was the adapter made for another model?"
            )
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{weights}: tensor {key!r} holds NaN or Inf; {_PEFT_FIX}")
        found.setdefault(name, {})[which] = t
    if not found:
        raise UserError(f"{weights}: holds no LoRA weights; {_PEFT_FIX}")
    for name, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: module {name!r} has lora_{''.join(ab)} only; {_PEFT_FIX}")
        out_f, in_f = modules[name].weight.shape
        A, B = ab["A"], ab["B"]
        if (
            A.dim() != 2
            or B.dim() != 2
            or A.shape[1] != in_f
            or B.shape[0] != out_f
            or A.shape[0] != B.shape[1]
        ):
            raise UserError(
                f"{weights}: module {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                f"which do not fit its weight {(out_f, in_f)}; was the adapter made for another model?"
            )
        if A.shape[0] != conf["r"] and not conf.get("rank_pattern"):
            raise UserError(
                f"{weights}: module {name!r} has rank {A.shape[0]} but adapter_config.json says r = "
                f"{conf['r']}; {_PEFT_FIX}"
            )
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"{adapter_dir}: PEFT could not load the adapter ({type(exc).__name__}: {first}); {_PEFT_FIX}"
        ) from None
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    if wrapped != set(found):
        raise UserError(
            f"{adapter_dir / 'adapter_config.json'}: target_modules select {sorted(wrapped)} but the weights "
            f"are for {sorted(found)}; {_PEFT_FIX}"
        )
    return peft_model


if __name__ == "__main__":
    raise SystemExit(main())
