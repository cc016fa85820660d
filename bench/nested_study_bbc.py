"""The SmolLM2 BBC News arm of the nested-objective study (issue #11.6).

Variants of PreLort's nested objective on ``configs/bench-bbc.toml`` (SmolLM2-135M, 6 Dirichlet
non-IID clients at ranks {2, 4, 8}, 10 rounds x 3 stratified clients x 4 passes, matched passes,
200 test articles whose split follows the seed). Each variant runs through ``prelort compare``
into its own folder, so runs resume and finished runs are reused. Plain segment-wise averaging
and the default (``sample``, own weight 0.7, fixed scaling) are exactly the ``segment`` and
``prelort`` runs of the SmolLM2 BBC comparison (``bench/results/smollm2-bbc``); they are read from
there after checking that their stored config is the one these overrides resolve to.

The report gives accuracy and perplexity of the global adapter truncated at r = 2 and 8, each
variant minus the variant of the same scaling without nesting (segment), paired by seed, with a
95% t-interval; and how many seeds lose accuracy from r = 2 to r = 8 (non-monotone).

    .venv/bin/python bench/nested_study_bbc.py                  # all variants, seeds 0,1,2
    .venv/bin/python bench/nested_study_bbc.py --report-only    # tables and plot only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from nested_study import cell_text, paired_interval

CONFIG = ROOT / "configs" / "bench-bbc.toml"
COMPARISON = ROOT / "bench" / "results" / "smollm2-bbc"

# variant -> (method, overrides of configs/bench-bbc.toml, reference variant for the paired diff)
# The prelort variants ran before issue #18 changed PreLort's defaults: they pin what they ran
# with (ownership order, own weight 0.7), so re-running this script reproduces them.
_LIT = ['aggregation.order="ownership"']
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "segment": ("segment", [], "segment"),
    "sample-0.7": ("prelort-literal", [], "segment"),
    "sample-equal": ("prelort", [*_LIT, 'train.own_weight="equal"'], "segment"),
    "sample-geometric": ("prelort", [*_LIT, 'train.own_weight="geometric"'], "segment"),
    "all-0.7": ("prelort", [*_LIT, "train.own_weight=0.7", 'train.nested_mode="all"'], "segment"),
    "segment-per_rank": ("segment", ['lora.scaling="per_rank"'], "segment-per_rank"),
    "sample-0.7-per_rank": (
        "prelort",
        [*_LIT, "train.own_weight=0.7", 'lora.scaling="per_rank"'],
        "segment-per_rank",
    ),
    "sample-0.7-ffa": ("prelort", [*_LIT, "train.own_weight=0.7", 'train.factors="b-only"'], "segment"),
    "sample-0.7-alt": ("prelort", [*_LIT, "train.own_weight=0.7", 'train.factors="alternate"'], "segment"),
}
REUSED = {"segment", "sample-0.7"}  # identical to the comparison's runs
LEVELS = ["2", "8"]
METRICS = {"accuracy": False, "perplexity": True}  # metric -> lower is better


def _folder(out: Path, variant: str) -> Path:
    return COMPARISON if variant in REUSED else out / variant


def run_variant(out: Path, variant: str, seeds: str) -> None:
    """``prelort compare`` for one variant (resumes, reuses finished runs)."""
    method, sets, _ = VARIANTS[variant]
    prelort = Path(sys.executable).with_name("prelort")  # the CLI of the running environment
    cmd = [str(prelort), "compare", "--config", str(CONFIG)]
    cmd += ["--methods", method, "--seeds", seeds, "--out", str(out / variant), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _check_reused(variant: str, run: dict[str, Any], seed: int) -> None:
    from prelort.config import config_to_dict, load_config, same_config
    from prelort.federation.methods import unused_keys

    method, sets, _ = VARIANTS[variant]
    want = config_to_dict(load_config(CONFIG, [*sets, f'run.method="{method}"', f"run.seed={seed}"]))
    if not same_config(run.get("config"), want, unused_keys(method)):
        raise SystemExit(f"{variant} seed {seed}: the comparison's run was made with another config")


def load_runs(out: Path, seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> final per-rank metrics and passes (finished runs only)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for variant, (method, _, _) in VARIANTS.items():
        for seed in seeds:
            path = _folder(out, variant) / "runs" / f"{method}-seed{seed}" / "results.json"
            if not path.is_file():
                continue
            run = json.loads(path.read_text())
            if variant in REUSED:
                _check_reused(variant, run, seed)
            rows.setdefault(variant, {})[seed] = {
                "per_rank": {lv: run["final"]["per_rank"][lv] for lv in LEVELS},
                "total_passes": run["total_passes"],
                "results": str(path.relative_to(ROOT)),
            }
    return rows


def report(rows: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Means per variant, paired differences vs the variant's reference, non-monotone seeds."""
    cells = []
    for variant, by_seed in rows.items():
        ref = rows.get(VARIANTS[variant][2], {})
        cell: dict[str, Any] = {
            "variant": variant,
            "method": VARIANTS[variant][0],
            "overrides": VARIANTS[variant][1],
            "reference": VARIANTS[variant][2],
            "seeds": sorted(by_seed),
            "mean_passes": sum(r["total_passes"] for r in by_seed.values()) / len(by_seed),
            "mean": {},
            "diff": {},
            "non_monotone_accuracy": sum(
                1 for r in by_seed.values() if r["per_rank"]["8"]["accuracy"] < r["per_rank"]["2"]["accuracy"]
            ),
        }
        for metric in METRICS:
            for lv in LEVELS:
                vals = [r["per_rank"][lv][metric] for r in by_seed.values()]
                cell["mean"][f"{metric}@{lv}"] = sum(vals) / len(vals)
                paired = sorted(set(by_seed) & set(ref))
                if variant != VARIANTS[variant][2] and paired:
                    d = [by_seed[s]["per_rank"][lv][metric] - ref[s]["per_rank"][lv][metric] for s in paired]
                    cell["diff"][f"{metric}@{lv}"] = paired_interval(d)
        cells.append(cell)
    return {"cells": cells}


def markdown(rep: dict[str, Any], command: str) -> str:
    cols = [f"{m}@{lv}" for m in METRICS for lv in LEVELS]
    lines = [
        "# Nested-objective study, SmolLM2-135M on BBC News (matched passes, stratified sampling)",
        "",
        f"`{command}`; config `configs/bench-bbc.toml`. Final accuracy (higher is better) and",
        "perplexity (lower is better) of the global adapter truncated at r. In brackets: the variant",
        "minus segment-wise averaging at the same scaling, paired by seed, mean and 95% t-interval.",
        "`segment` and `sample-0.7` are the `segment` and `prelort-literal` runs of",
        "`bench/results/smollm2-bbc`.",
        "`acc r8<r2`: seeds whose rank-8 truncation is less accurate than its rank-2 prefix.",
        "",
        "| variant | seeds | passes | " + " | ".join(c.replace("@", " r=") for c in cols) + " | acc r8<r2 |",
        "|---|---:|---:|" + "---:|" * len(cols) + "---:|",
    ]
    for cell in rep["cells"]:
        parts = [cell_text(cell["mean"][c], cell["diff"].get(c)) for c in cols]
        lines.append(
            f"| {cell['variant']} | {len(cell['seeds'])} | {cell['mean_passes']:.0f} | "
            + " | ".join(parts)
            + f" | {cell['non_monotone_accuracy']}/{len(cell['seeds'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for cell in rep["cells"]:
            style = "--" if cell["variant"].startswith("segment") else "-"
            ys = [cell["mean"][f"{metric}@{lv}"] for lv in LEVELS]
            ax.plot([int(lv) for lv in LEVELS], ys, style, marker="o", label=cell["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(lv) for lv in LEVELS], LEVELS)
        ax.set_xlabel("rank r of the truncated global adapter")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Nested objective on SmolLM2 BBC News (dashed: no nesting)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "nested_study_bbc"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report_only:
        for variant in args.variants.split(","):
            if variant not in REUSED:
                run_variant(out, variant, args.seeds)
    seeds = [int(s) for s in args.seeds.split(",")]
    rep = report(load_runs(out, seeds))
    command = "python bench/nested_study_bbc.py " + " ".join(sys.argv[1:])
    rep["machine"] = machine()
    rep["command"] = command.strip()
    rep["config"] = str(CONFIG.relative_to(ROOT))
    write_json(out / "study.json", rep)
    (out / "study.md").write_text(markdown(rep, command.strip()))
    plot(rep, out / "study.png")
    print(markdown(rep, command.strip()))


if __name__ == "__main__":
    main()
