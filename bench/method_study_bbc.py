"""SmolLM2 BBC arm of the method study (issue #18; bench/method_study_prereg.md, "confirmation").

The winner (``prelort``, PreLort's new default) and the runner-up (``rbal-sched``: the same with
own weight 0.7 rising to 1) on configs/bench-bbc.toml, seeds 0-2, each through ``prelort
compare`` (runs resume; the winner's runs are those of bench/results/smollm2-bbc). Reports
accuracy and perplexity at r = 2 and 8 and the paired differences (95% t-interval) of the
winner against the runner-up, the literal reading, FlexLoRA and RB-LoRA.

    .venv/bin/python bench/method_study_bbc.py             # runs what is missing, then the report
    .venv/bin/python bench/method_study_bbc.py --report-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, write_json
from nested_study import cell_text, paired_interval

CONFIG = ROOT / "configs" / "bench-bbc.toml"
COMPARISON = ROOT / "bench" / "results" / "smollm2-bbc"
OUT = ROOT / "bench" / "results" / "method_study_bbc"
RUNNER_UP = ["train.own_weight=0.7", "train.own_weight_final=1.0"]
LEVELS = ["2", "8"]
METRICS = ("accuracy", "perplexity")


def _runs(folder: Path, method: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for s in seeds:
        f = folder / "runs" / f"{method}-seed{s}" / "results.json"
        if f.is_file():
            out[s] = json.loads(f.read_text())["final"]["per_rank"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        cli = str(Path(sys.executable).with_name("prelort"))
        base = [cli, "compare", "--config", str(CONFIG), "--seeds", args.seeds, "--quiet"]
        subprocess.run([*base, "--methods", "prelort", "--out", str(COMPARISON)], check=True)
        sets = [x for s in RUNNER_UP for x in ("--set", s)]
        subprocess.run([*base, "--methods", "prelort", "--out", str(OUT / "rbal-sched"), *sets], check=True)
    variants = {
        "prelort (winner)": _runs(COMPARISON, "prelort", seeds),
        "rbal-sched (runner-up)": _runs(OUT / "rbal-sched", "prelort", seeds),
        "prelort-literal": _runs(COMPARISON, "prelort-literal", seeds),
        "flexlora": _runs(COMPARISON, "flexlora", seeds),
        "rb-lora": _runs(COMPARISON, "rb-lora", seeds),
    }
    win = variants["prelort (winner)"]
    lines = [
        "# Method study, SmolLM2 BBC arm (confirmation; bench/method_study_prereg.md)",
        "",
        f"configs/bench-bbc.toml, seeds {args.seeds}. Mean over seeds; in brackets the winner minus",
        "the row, paired by seed, 95% t-interval (3 seeds: wide intervals).",
        "",
        "| variant | n | " + " | ".join(f"{m} r={lv}" for m in METRICS for lv in LEVELS) + " |",
        "|---|---:|" + "---:|" * (len(METRICS) * len(LEVELS)),
    ]
    report: dict[str, Any] = {"seeds": seeds, "variants": {}}
    for name, runs in variants.items():
        if not runs:
            continue
        cells, rec = [], {}
        for m in METRICS:
            for lv in LEVELS:
                vals = [r[lv][m] for r in runs.values()]
                mean = sum(vals) / len(vals)
                common = sorted(set(runs) & set(win))
                diff = None
                if name != "prelort (winner)" and len(common) >= 2:
                    diff = paired_interval([win[s][lv][m] - runs[s][lv][m] for s in common])
                cells.append(cell_text(mean, diff))
                rec[f"{m}@{lv}"] = {"mean": mean, "winner_minus": diff}
        report["variants"][name] = {"n": len(runs), **rec}
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    ru = report["variants"].get("rbal-sched (runner-up)", {})
    overturn = all(
        ru.get(f"accuracy@{lv}", {}).get("winner_minus") is not None
        and ru[f"accuracy@{lv}"]["winner_minus"]["ci_high"] < 0
        for lv in LEVELS
    )
    report["overturns_choice"] = overturn
    lines += [
        "",
        "Pre-registered rule: the BBC arm changes the choice only if the winner is worse than the",
        "runner-up on accuracy with an interval excluding 0 at both levels: "
        + ("**it does**." if overturn else "it does not."),
        "",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.md").write_text("\n".join(lines))
    write_json(OUT / "summary.json", report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
