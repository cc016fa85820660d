"""Issue #19 acceptance: the committed synthetic comparison, re-run on seed 0 after the
rules-own-their-state refactor, gives the committed final metrics.

Every ``bench/results/synthetic/runs/*-seed0`` folder is re-run in-process from its own
``config.toml`` (keys added since then take their defaults) and its final per-rank metrics
compared with the committed ``results.json``. Writes ``bench/results/refactor_check.json``
with, per method, the largest absolute difference of any final metric and whether the
metrics are bit-identical.

    OMP_NUM_THREADS=1 .venv/bin/python bench/refactor_check.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "synthetic" / "runs"
OUT = ROOT / "bench" / "results" / "refactor_check.json"


def main() -> int:
    import torch

    from prelort.config import load_config
    from prelort.federation import run_simulation
    from prelort.workloads import build_workload

    torch.set_num_threads(1)
    rows = {}
    for folder in sorted(RUNS.glob("*-seed0")):
        stored = json.loads((folder / "results.json").read_text())
        cfg = load_config(folder / "config.toml")
        t0 = time.perf_counter()
        res = run_simulation(cfg, build_workload(cfg))
        diffs = [
            abs(float(res["final"]["per_rank"][lv][k]) - float(v))
            for lv, metrics in stored["final"]["per_rank"].items()
            for k, v in metrics.items()
        ]
        rows[stored["method"]] = {
            "max_abs_diff": max(diffs),
            "bit_identical": res["final"]["per_rank"] == stored["final"]["per_rank"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(stored["method"], rows[stored["method"]], flush=True)
    OUT.write_text(json.dumps({"runs": rows, "tolerance": 1e-6}, indent=2) + "\n")
    worst = max(r["max_abs_diff"] for r in rows.values())
    print(f"wrote {OUT}; largest difference {worst:.3g}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
