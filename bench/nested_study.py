"""Study of PreLort's nested objective at matched passes, to choose its defaults (issue #11.6).

Every variant runs with ``train.budget = "passes"`` and stratified sampling on the synthetic
workload, in several settings (populations and teachers), under the three scalings s(r), over
several seeds. Runs are appended to a JSONL file as they finish, so an interrupted study
resumes where it stopped. The report (JSON + Markdown + plot) gives relative test MSE per
rank level, each variant minus plain segment-wise averaging paired by seed (95% interval),
and how often quality gets worse as r grows (non-monotone steps).

    .venv/bin/python bench/nested_study.py                # all settings, 5 seeds
    .venv/bin/python bench/nested_study.py --report-only  # tables and plot from the JSONL
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from common import ROOT, machine, write_json

SETTINGS: dict[str, list[str]] = {
    # configs/synthetic.toml: 8 clients, ranks {2,4,8,16} round-robin, 4 per round
    "balanced": [],
    # most clients at the lowest rank (p(level j) ~ 2^-j), 16 clients, 4 per round
    "mostly-low": [
        'clients.rank_distribution="heavy-tail"',
        "clients.num_clients=16",
        "run.clients_per_round=4",
    ],
    # flatter teacher spectrum, stronger non-IID inputs, fewer local passes, 3 per round
    "flat-noniid": [
        "synthetic.spectrum_decay=0.9",
        "synthetic.input_shift=2.0",
        "train.steps=6",
        "run.clients_per_round=3",
    ],
}

VARIANTS: dict[str, list[str]] = {
    "segment": ['run.method="segment"'],
    "sample-0.7": ['run.method="prelort"', 'train.nested_mode="sample"', "train.own_weight=0.7"],
    "sample-0.5": ['run.method="prelort"', 'train.nested_mode="sample"', "train.own_weight=0.5"],
    "sample-equal": ['run.method="prelort"', 'train.nested_mode="sample"', 'train.own_weight="equal"'],
    "sample-geometric": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        'train.own_weight="geometric"',
    ],
    "all-0.7": ['run.method="prelort"', 'train.nested_mode="all"', "train.own_weight=0.7"],
    "all-equal": ['run.method="prelort"', 'train.nested_mode="all"', 'train.own_weight="equal"'],
    "all-geometric": ['run.method="prelort"', 'train.nested_mode="all"', 'train.own_weight="geometric"'],
    "segment-ffa": ['run.method="segment"', 'train.factors="b-only"'],
    "sample-0.5-ffa": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        "train.own_weight=0.5",
        'train.factors="b-only"',
    ],
    "segment-alt": ['run.method="segment"', 'train.factors="alternate"'],
    "sample-0.5-alt": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        "train.own_weight=0.5",
        'train.factors="alternate"',
    ],
    "segment-lr1e-2": ['run.method="segment"', "train.lr=0.01"],
    "sample-0.5-lr1e-2": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        "train.own_weight=0.5",
        "train.lr=0.01",
    ],
    "segment-lr1e-3": ['run.method="segment"', "train.lr=0.001"],
    "sample-0.5-lr1e-3": [
        'run.method="prelort"',
        'train.nested_mode="sample"',
        "train.own_weight=0.5",
        "train.lr=0.001",
    ],
}

SCALINGS = ["fixed", "per_rank", "rslora"]
# aggregation.order pinned to what the study ran with (before issue #18 changed prelort's default)
COMMON = [
    'train.budget="passes"',
    'run.sampling="stratified"',
    "run.eval_every=1000",
    'aggregation.order="ownership"',
]


def run_one(setting: str, variant: str, scaling: str, seed: int) -> dict[str, Any]:
    """One in-process run; returns its final per-rank relative MSE and compute."""
    from prelort.config import load_config
    from prelort.federation.simulator import run_simulation
    from prelort.workloads import build_workload

    sets = [*COMMON, *SETTINGS[setting], *VARIANTS[variant], f'lora.scaling="{scaling}"', f"run.seed={seed}"]
    cfg = load_config(ROOT / "configs" / "synthetic.toml", sets)
    res = run_simulation(cfg, build_workload(cfg))
    return {
        "setting": setting,
        "variant": variant,
        "scaling": scaling,
        "seed": seed,
        "rel_loss": {lv: m["rel_loss"] for lv, m in res["final"]["per_rank"].items()},
        "total_passes": res["total_passes"],
        "seconds": res["total_seconds"],
        "overrides": sets,
    }


def read_rows(log: Path) -> list[dict[str, Any]]:
    """The finished runs of a study: one JSON object per line of ``log`` (none if absent)."""
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def run_jobs(
    log: Path, rows: list[dict[str, Any]], todo: list[tuple[Any, ...]], run: Callable[..., dict[str, Any]]
) -> None:
    """Run every job of ``todo`` (``run(*job)``) at $PRELORT_THREADS torch threads (default 1),
    appending each finished row to ``rows`` and to ``log`` at once, so a study resumes."""
    import torch

    torch.set_num_threads(int(os.environ.get("PRELORT_THREADS", "1")))
    t0 = time.perf_counter()
    for i, job in enumerate(todo, 1):
        row = run(*job)
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        eta = (time.perf_counter() - t0) / i * (len(todo) - i)
        r_min = next(iter(row["rel_loss"].values()))
        print(f"[{i}/{len(todo)}] {job}: r_min {r_min:.3f}, eta {eta:.0f}s", flush=True)


def _key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return (r["setting"], r["variant"], r["scaling"], int(r["seed"]))


def _t95(df: int) -> float:
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    return table[df - 1] if df <= len(table) else 1.96


def paired_interval(diffs: list[float]) -> dict[str, float]:
    """Mean of paired differences and its 95% Student-t interval (NaN bounds for one pair)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan")}
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    half = _t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def cell_text(mean: float, diff: dict[str, float] | None) -> str:
    """``mean [diff, low..high]`` for a table cell (no brackets without a paired difference)."""
    text = f"{mean:.3f}"
    if diff is not None:
        text += f" [{diff['mean']:+.3f}, {diff['ci_low']:+.3f}..{diff['ci_high']:+.3f}]"
    return text


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per cell, paired differences vs segment (same setting/scaling/seed), a ranking."""
    cells: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
    passes: dict[tuple[str, str, str], list[int]] = {}
    for r in rows:
        cells.setdefault((r["setting"], r["scaling"], r["variant"]), {})[r["seed"]] = r["rel_loss"]
        passes.setdefault((r["setting"], r["scaling"], r["variant"]), []).append(r["total_passes"])
    out: dict[str, Any] = {"cells": [], "ranking": [], "monotonicity": {}}
    score: dict[str, list[float]] = {}
    score_by_scaling: dict[tuple[str, str], list[float]] = {}
    for (setting, scaling, variant), by_seed in sorted(cells.items()):
        levels = sorted(next(iter(by_seed.values())), key=int)
        ref = cells.get((setting, scaling, "segment"), {})
        cell: dict[str, Any] = {
            "setting": setting,
            "scaling": scaling,
            "variant": variant,
            "n": len(by_seed),
            "mean_passes": sum(passes[(setting, scaling, variant)]) / len(by_seed),
            "mean": {},
            "diff_vs_segment": {},
        }
        non_mono = 0
        for seed_vals in by_seed.values():
            non_mono += sum(1 for a, b in itertools.pairwise(levels) if seed_vals[b] > seed_vals[a] + 1e-9)
        cell["non_monotone_steps"] = non_mono
        cell["monotone_checks"] = len(by_seed) * (len(levels) - 1)
        for lv in levels:
            vals = [v[lv] for v in by_seed.values()]
            cell["mean"][lv] = sum(vals) / len(vals)
            seeds = sorted(set(by_seed) & set(ref))
            if seeds and variant != "segment":
                d = [by_seed[s][lv] - ref[s][lv] for s in seeds]
                cell["diff_vs_segment"][lv] = paired_interval(d)
        # scale-free score: mean over levels of log(rel MSE), lower is better
        s = sum(math.log(cell["mean"][lv]) for lv in levels) / len(levels)
        cell["mean_log_rel_loss"] = s
        score.setdefault(variant, []).append(s)
        score_by_scaling.setdefault((variant, scaling), []).append(s)
        out["cells"].append(cell)
    out["ranking"] = sorted(
        ({"variant": v, "mean_log_rel_loss": sum(x) / len(x), "cells": len(x)} for v, x in score.items()),
        key=lambda e: e["mean_log_rel_loss"],
    )
    out["ranking_by_scaling"] = sorted(
        (
            {"variant": v, "scaling": sc, "mean_log_rel_loss": sum(x) / len(x), "cells": len(x)}
            for (v, sc), x in score_by_scaling.items()
        ),
        key=lambda e: e["mean_log_rel_loss"],
    )
    return out


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# Nested-objective study (synthetic, matched passes, stratified sampling)",
        "",
        "Relative test MSE of the global adapter truncated at r (lower is better), mean over seeds;",
        "in brackets: variant minus plain segment-wise averaging, paired by seed, 95% interval.",
        "`non-mono` counts (seed, r) steps where quality got worse as r grew.",
        "",
        "## Ranking (mean over settings and scalings of the mean log relative MSE over levels)",
        "",
        "| variant | score | cells |",
        "|---|---:|---:|",
    ]
    for e in rep["ranking"]:
        lines.append(f"| {e['variant']} | {e['mean_log_rel_loss']:.4f} | {e['cells']} |")
    lines += ["", "## Ranking per scaling (top 8)", "", "| variant | scaling | score |", "|---|---|---:|"]
    for e in rep["ranking_by_scaling"][:8]:
        lines.append(f"| {e['variant']} | {e['scaling']} | {e['mean_log_rel_loss']:.4f} |")
    current = None
    for cell in rep["cells"]:
        head = (cell["setting"], cell["scaling"])
        levels = list(cell["mean"])
        if head != current:
            current = head
            lines += [
                "",
                f"## {cell['setting']}, scaling {cell['scaling']}",
                "",
                "| variant | passes | " + " | ".join(f"r={lv}" for lv in levels) + " | non-mono |",
                "|---|---:|" + "---:|" * len(levels) + "---:|",
            ]
        parts = [cell_text(cell["mean"][lv], cell["diff_vs_segment"].get(lv)) for lv in levels]
        lines.append(
            f"| {cell['variant']} | {cell['mean_passes']:.0f} | "
            + " | ".join(parts)
            + f" | {cell['non_monotone_steps']}/{cell['monotone_checks']} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path, variants: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({c["setting"] for c in rep["cells"]})
    fig, axes = plt.subplots(
        len(SCALINGS), len(settings), figsize=(4 * len(settings), 3.2 * len(SCALINGS)), squeeze=False
    )
    for i, scaling in enumerate(SCALINGS):
        for j, setting in enumerate(settings):
            ax = axes[i][j]
            for c in rep["cells"]:
                if c["setting"] == setting and c["scaling"] == scaling and c["variant"] in variants:
                    lv = [int(x) for x in c["mean"]]
                    ax.plot(lv, list(c["mean"].values()), marker="o", label=c["variant"])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{setting}, {scaling}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("rank r of the truncated global adapter")
    fig.supylabel("relative test MSE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scalings", default=",".join(SCALINGS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "nested_study"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    rows = read_rows(log)
    done = {_key(r) for r in rows}
    if not args.report_only:
        todo = [
            (st, v, sc, int(sd))
            for st in args.settings.split(",")
            for sc in args.scalings.split(",")
            for sd in args.seeds.split(",")
            for v in args.variants.split(",")
            if (st, v, sc, int(sd)) not in done
        ]
        run_jobs(log, rows, todo, run_one)
    rep = report(rows)
    rep["machine"] = machine()
    rep["command"] = "python bench/nested_study.py " + " ".join(sys.argv[1:])
    rep["settings"] = SETTINGS
    rep["variants"] = VARIANTS
    rep["common_overrides"] = COMMON
    write_json(out / "study.json", rep)
    (out / "study.md").write_text(markdown(rep))
    top = [e["variant"] for e in rep["ranking"][:5]]
    plot(rep, out / "study.png", sorted(set(top) | {"segment"}))
    print(markdown(rep)[:3000])


if __name__ == "__main__":
    main()
