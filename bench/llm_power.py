"""Power of the LLM comparisons (issue #18 item 5): the smallest difference each can detect.

For a finished ``prelort compare`` folder, every pair (PreLort, rank-limited baseline), every
evaluated rank and metric: the paired differences over the seeds both have, their mean, the
half-width of the 95% Student-t interval (the smallest mean difference the comparison can tell
from zero at that n), the seeds it would take for a half-width of a given target at the same
spread (n with t_{n-1} sd / sqrt(n) <= target), and the CPU time per run.

    .venv/bin/python bench/llm_power.py bench/results/smollm2-bbc [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nested_study import _t95, paired_interval

BASELINES = ("prelort-literal", "segment", "flexlora", "rb-lora", "raflora", "hetlora")


def load(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """method -> seed -> finished results.json."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted((folder / "runs").glob("*-seed*/results.json")):
        res = json.loads(f.read_text())
        out.setdefault(res["method"], {})[int(res["seed"])] = res
    return out


def seeds_needed(sd: float, target: float) -> int | None:
    """Smallest n >= 2 with t_{n-1} sd / sqrt(n) <= target (None if sd is 0 or n > 100)."""
    if sd <= 0 or target <= 0:
        return None
    for n in range(2, 101):
        if _t95(n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None


def power(folder: Path, method: str = "prelort") -> dict[str, Any]:
    runs = load(folder)
    mine = runs.get(method, {})
    rows = []
    for base in BASELINES:
        if base == method:
            continue
        theirs = runs.get(base, {})
        seeds = sorted(set(mine) & set(theirs))
        if len(seeds) < 2:
            continue
        for lv, metrics in mine[seeds[0]]["final"]["per_rank"].items():
            for metric in metrics:
                if metric == "loss":
                    continue
                d = [
                    mine[s]["final"]["per_rank"][lv][metric] - theirs[s]["final"]["per_rank"][lv][metric]
                    for s in seeds
                ]
                p = paired_interval(d)
                sd = math.sqrt(sum((x - p["mean"]) ** 2 for x in d) / (len(d) - 1))
                half = (p["ci_high"] - p["ci_low"]) / 2
                rows.append(
                    {
                        "baseline": base,
                        "rank": int(lv),
                        "metric": metric,
                        "n": len(seeds),
                        "mean_diff": p["mean"],
                        "ci": [p["ci_low"], p["ci_high"]],
                        "half_width": half,
                        "sd_of_diff": sd,
                        "seeds_for_half_width_of_mean": seeds_needed(sd, abs(p["mean"])),
                    }
                )
    seconds = [r["total_seconds"] for by in runs.values() for r in by.values() if "total_seconds" in r]
    return {
        "folder": str(folder),
        "method": method,
        "mean_seconds_per_run": sum(seconds) / len(seconds) if seconds else None,
        "pairs": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--method", default="prelort")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rep = power(args.folder, args.method)
    text = json.dumps(rep, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    head = ("baseline", "r", "metric", "n", "mean", "half-width", "n for |mean|")
    print("{:>16} {:>2} {:>10} {:>2} {:>8} {:>10} {:>12}".format(*head))
    for r in rep["pairs"]:
        need = r["seeds_for_half_width_of_mean"]
        print(
            f"{r['baseline']:>16} {r['rank']:>2} {r['metric']:>10} {r['n']:>2} {r['mean_diff']:+8.4f} "
            f"{r['half_width']:10.4f} {need if need is not None else '>100':>12}"
        )


if __name__ == "__main__":
    main()
