"""PreLort's method study (issue #18), as pre-registered in bench/method_study_prereg.md.

28 segment-wise candidates (4 rank-dimension orders x 7 local-training variants) and the
rank-limited baselines on the three public synthetic settings, 5 seeds, matched passes. Runs
are appended to a JSONL file as they finish (an interrupted study resumes). The report gives,
per (setting, rank), each candidate minus the best baseline paired by seed (95% interval), the
area under the rank curve, and the winner by the pre-registered rule.

    .venv/bin/python bench/method_study.py                # every run, then the report
    .venv/bin/python bench/method_study.py --report-only  # tables and plot from the JSONL
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, write_json
from nested_study import SETTINGS, cell_text, paired_interval, read_rows, run_jobs

LEVELS = ["2", "4", "8", "16"]

ORDERS: dict[str, list[str]] = {
    "own": ['aggregation.order="ownership"'],
    "rb": ['aggregation.order="round"', 'aggregation.split="b"'],
    "rbal": ['aggregation.order="round"', 'aggregation.split="balanced"'],
    "ebal": ['aggregation.order="export"', 'aggregation.split="balanced"'],
}
TRAININGS: dict[str, list[str]] = {
    "plain": ['run.method="segment"'],
    "s07": ['run.method="prelort"', 'train.nested_mode="sample"', "train.own_weight=0.7"],
    "s09": ['run.method="prelort"', 'train.nested_mode="sample"', "train.own_weight=0.9"],
    "sched": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        "train.own_weight=0.7",
        "train.own_weight_final=1.0",
    ],
    "sand": ['run.method="prelort"', 'train.nested_mode="sandwich"', "train.own_weight=0.7"],
    "sandkd": [
        'run.method="prelort"',
        'train.nested_mode="sandwich"',
        "train.own_weight=0.7",
        "train.distill=0.5",
    ],
    "mat": ['run.method="prelort"', 'train.nested_mode="matryoshka"', "train.own_weight=0.7"],
}
CANDIDATES: dict[str, list[str]] = {
    f"{o}-{t}": [*ORDERS[o], *TRAININGS[t]] for o in ORDERS for t in TRAININGS
}
BASELINES: dict[str, list[str]] = {
    m: [f'run.method="{m}"'] for m in ("flexlora", "rb-lora", "raflora", "hetlora")
}
VARIANTS = {**CANDIDATES, **BASELINES}
# the pre-registered tie-break: own < ebal < rb < rbal, then the training variants in table order
SIMPLICITY = [f"{o}-{t}" for o in ("own", "ebal", "rb", "rbal") for t in TRAININGS]
COMMON = ['train.budget="passes"', 'run.sampling="stratified"', "run.eval_every=1000", 'lora.scaling="fixed"']


def run_one(setting: str, variant: str, seed: int) -> dict[str, Any]:
    """One in-process run; its final per-rank relative MSE and compute."""
    from prelort.config import load_config
    from prelort.federation.simulator import run_simulation
    from prelort.workloads import build_workload

    sets = [*COMMON, *SETTINGS[setting], *VARIANTS[variant], f"run.seed={seed}"]
    cfg = load_config(ROOT / "configs" / "synthetic.toml", sets)
    res = run_simulation(cfg, build_workload(cfg))
    return {
        "setting": setting,
        "variant": variant,
        "seed": seed,
        "rel_loss": {lv: m["rel_loss"] for lv, m in res["final"]["per_rank"].items()},
        "total_passes": res["total_passes"],
        "seconds": res["total_seconds"],
        "overrides": sets,
    }


def aurc(vals: dict[str, float]) -> float:
    """Trapezoid area of rel MSE over log2 r, divided by the width log2(16 / 2) = 3."""
    xs = [math.log2(int(lv)) for lv in LEVELS]
    ys = [vals[lv] for lv in LEVELS]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-cell means and paired differences vs the best baseline; the pre-registered winner."""
    by: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for r in rows:
        by.setdefault((r["setting"], r["variant"]), {})[int(r["seed"])] = r["rel_loss"]
    settings = [s for s in SETTINGS if any(k[0] == s for k in by)]
    mean = {
        k: {lv: sum(v[lv] for v in seeds.values()) / len(seeds) for lv in LEVELS} for k, seeds in by.items()
    }
    out: dict[str, Any] = {"settings": {}, "candidates": {}}
    for s in settings:
        base = [b for b in BASELINES if (s, b) in by]
        best = {lv: min(base, key=lambda b, lv=lv: mean[(s, b)][lv]) for lv in LEVELS}
        base_aurc = {b: sum(aurc(v) for v in by[(s, b)].values()) / len(by[(s, b)]) for b in base}
        best_aurc = min(base_aurc.values())
        out["settings"][s] = {"best_baseline": best, "baseline_aurc": base_aurc}
        for v in VARIANTS:
            if (s, v) not in by:
                continue
            seeds = by[(s, v)]
            cell: dict[str, Any] = {"mean": mean[(s, v)], "n": len(seeds), "diff": {}, "verdict": {}}
            for lv in LEVELS:
                ref = by[(s, best[lv])]
                common = sorted(set(seeds) & set(ref))
                d = paired_interval([seeds[k][lv] - ref[k][lv] for k in common])
                cell["diff"][lv] = d
                cell["verdict"][lv] = "win" if d["ci_high"] < 0 else "loss" if d["ci_low"] > 0 else "tie"
            a = sum(aurc(x) for x in seeds.values()) / len(seeds)
            cell["aurc"] = a
            cell["aurc_ratio"] = a / best_aurc
            out["candidates"].setdefault(v, {})[s] = cell
    ranking = []
    for v in CANDIDATES:
        cells = out["candidates"].get(v, {})
        if len(cells) != len(settings):
            continue
        losses = sum(1 for c in cells.values() for x in c["verdict"].values() if x == "loss")
        wins = sum(1 for c in cells.values() for x in c["verdict"].values() if x == "win")
        ratio = sum(c["aurc_ratio"] for c in cells.values()) / len(cells)
        ranking.append({"candidate": v, "losses": losses, "wins": wins, "aurc_ratio": ratio})
    ranking.sort(key=lambda e: (e["losses"], e["aurc_ratio"], SIMPLICITY.index(e["candidate"])))
    out["ranking"] = ranking
    out["winner"] = ranking[0]["candidate"] if ranking else None
    nested = [e for e in ranking if not e["candidate"].endswith("-plain")]
    out["winner_with_nesting"] = nested[0]["candidate"] if nested else None
    return out


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# PreLort method study (synthetic, matched passes; pre-registered in bench/method_study_prereg.md)",
        "",
        "Relative test MSE of the rank-r global adapter (lower is better), mean over seeds; in",
        "brackets: candidate minus the best rank-limited baseline of that cell (named in the header),",
        "paired by seed, 95% interval. AURC: area under the rank curve over log2 r, / 3; ratio to",
        "the best baseline's AURC of the setting.",
        "",
        f"**Winner (pre-registered rule): `{rep['winner']}`**; best with nesting: "
        f"`{rep['winner_with_nesting']}`.",
        "",
        "## Ranking (fewest losses, then mean AURC ratio, then simplicity)",
        "",
        "| candidate | losses / 12 | wins / 12 | mean AURC ratio |",
        "|---|---:|---:|---:|",
    ]
    for e in rep["ranking"]:
        lines.append(f"| {e['candidate']} | {e['losses']} | {e['wins']} | {e['aurc_ratio']:.3f} |")
    for s, info in rep["settings"].items():
        head = " | ".join(f"r={lv} (vs {info['best_baseline'][lv]})" for lv in LEVELS)
        lines += ["", f"## {s}", "", f"| variant | {head} | AURC (ratio) |", "|---|" + "---:|" * 5]
        for v, cells in rep["candidates"].items():
            if s not in cells:
                continue
            c = cells[s]
            is_base = v in BASELINES
            parts = [cell_text(c["mean"][lv], None if is_base else c["diff"][lv]) for lv in LEVELS]
            lines.append(f"| {v} | " + " | ".join(parts) + f" | {c['aurc']:.4f} ({c['aurc_ratio']:.3f}) |")
    lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(rep["settings"])
    show = [*BASELINES, "own-s07", "own-plain", rep["winner"], rep["winner_with_nesting"]]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for j, s in enumerate(settings):
        ax = axes[0][j]
        for v in dict.fromkeys(x for x in show if x):
            c = rep["candidates"].get(v, {}).get(s)
            if c is None:
                continue
            style = "--" if v in BASELINES else "-"
            ax.plot([int(x) for x in LEVELS], [c["mean"][lv] for lv in LEVELS], style, marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("rank r of the global adapter")
    fig.supylabel("relative test MSE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "method_study"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    rows = read_rows(log)
    done = {(r["setting"], r["variant"], int(r["seed"])) for r in rows}
    if not args.report_only:
        todo = [
            (st, v, int(sd))
            for st in args.settings.split(",")
            for sd in args.seeds.split(",")
            for v in args.variants.split(",")
            if (st, v, int(sd)) not in done
        ]
        run_jobs(log, rows, todo, run_one)
    rep = report(rows)
    rep["machine"] = machine()
    rep["command"] = "python bench/method_study.py " + " ".join(sys.argv[1:])
    rep["variants"] = VARIANTS
    rep["common_overrides"] = COMMON
    write_json(out / "study.json", rep)
    (out / "study.md").write_text(markdown(rep))
    plot(rep, out / "study.png")
    print(markdown(rep)[:4000])


if __name__ == "__main__":
    main()
