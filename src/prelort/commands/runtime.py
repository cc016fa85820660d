"""``prelort run --runtime flower-simulation | flower-deployment``: one command for every runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from prelort.errors import UserError


def run_flower(args: argparse.Namespace) -> int:
    """``prelort run --runtime flower-...``: the same rounds on a loopback Flower federation
    (``prelort.flower.local``); a run started again with the same ``--out`` resumes."""
    from prelort.flower.local import main as flower_main

    if args.resume:
        out = Path(args.resume)
        if args.config or args.set or (args.out and Path(args.out) != out):
            raise UserError("--resume DIR takes the run's own config.toml; drop --config/--set/--out")
        if not (out / "config.toml").is_file():
            raise UserError(f"{out}: nothing to resume (no config.toml); start it with --config and --out")
        config, sets = str(out / "config.toml"), []
    else:
        if not args.config or not args.out:
            raise UserError("run needs --config FILE and --out DIR (or --resume DIR)")
        out, config, sets = Path(args.out), args.config, list(args.set)
    argv = ["--engine", args.runtime.removeprefix("flower-"), "--config", config, "--out", str(out)]
    argv += ["--workers", str(args.workers), "--timeout", str(args.timeout)]
    argv += [a for s in sets for a in ("--set", s)]
    if args.nodes is not None:
        argv += ["--nodes", str(args.nodes)]
    argv += ["--tls"] * args.tls + ["--auth"] * args.auth
    return flower_main(argv)
