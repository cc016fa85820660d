"""How fast a bad config is refused: wall time of `prelort run|compare` with a bad config.

Target (issue #10): exit status 2 in under 1 s. Each case runs the installed CLI in a fresh
process (so imports count) several times; the JSON gives the median and worst wall time.

    .venv/bin/python bench/config_latency.py   # -> bench/results/config_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json

CASES = {
    "unknown key": ["run", "--config", "configs/synthetic.toml", "--set", "run.bogus=1"],
    "nan learning rate": ["run", "--config", "configs/synthetic.toml", "--set", "train.lr=nan"],
    "zero size": ["run", "--config", "configs/synthetic.toml", "--set", "synthetic.d_in=0"],
    "unknown method": ["run", "--config", "configs/synthetic.toml", "--set", 'run.method="nope"'],
    "llm config, bad key": ["run", "--config", "configs/demo-bbc.toml", "--set", "llm.nope=1"],
    "compare, bad value": ["compare", "--config", "configs/synthetic.toml", "--set", "run.rounds=-1"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "config_latency.json"))
    args = p.parse_args()
    exe = str(Path(sys.executable).with_name("prelort"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in CASES.items():
            times, codes = [], set()
            for i in range(args.reps):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [exe, *argv, "--out", f"{tmp}/{i}"], cwd=ROOT, capture_output=True, text=True
                )
                times.append(time.perf_counter() - t0)
                codes.add(proc.returncode)
                lines = proc.stderr.strip().splitlines()
            results[name] = {
                "median_s": statistics.median(times),
                "max_s": max(times),
                "exit_codes": sorted(codes),
                "stderr": lines[-1] if lines else "",
            }
            print(f"{name}: median {results[name]['median_s']:.3f}s, max {results[name]['max_s']:.3f}s")
    worst = max(r["max_s"] for r in results.values())
    write_json(
        args.out,
        {
            "target_s": 1.0,
            "worst_s": worst,
            "met": worst < 1.0 and all(r["exit_codes"] == [2] for r in results.values()),
            "cases": results,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
