"""Summaries over methods and seeds: JSON, Markdown (mean ± std, best per column) and plots."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = {"loss", "rel_loss", "perplexity"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def area_under_rank_curve(per_rank: dict[str, dict[str, float]], metric: str) -> float:
    """Normalised trapezoidal area under metric vs level index (mean height of the curve)."""
    ys = [per_rank[k][metric] for k in sorted(per_rank, key=int)]
    if len(ys) == 1:
        return ys[0]
    return sum((a + b) / 2 for a, b in itertools.pairwise(ys)) / (len(ys) - 1)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate results dicts by method: per level and metric, mean/std/values over seeds."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    out: dict[str, Any] = {
        "methods": {},
        "levels": runs[0]["levels"],
        "seeds": sorted({r["seed"] for r in runs}),
    }
    for method, rs in by_method.items():
        levels = [str(lv) for lv in rs[0]["levels"]]
        metrics = list(rs[0]["final"]["per_rank"][levels[0]].keys())
        entry: dict[str, Any] = {"per_rank": {}, "auc": {}, "bytes_up": [], "bytes_down": []}
        for lv in levels:
            entry["per_rank"][lv] = {}
            for m in metrics:
                vals = [float(r["final"]["per_rank"][lv][m]) for r in rs]
                mean, std = _mean_std(vals)
                entry["per_rank"][lv][m] = {"mean": mean, "std": std, "values": vals}
        for m in metrics:
            vals = [area_under_rank_curve(r["final"]["per_rank"], m) for r in rs]
            mean, std = _mean_std(vals)
            entry["auc"][m] = {"mean": mean, "std": std, "values": vals}
        entry["bytes_up"] = [r["total_bytes_up"] for r in rs]
        entry["bytes_down"] = [r["total_bytes_down"] for r in rs]
        entry["seconds"] = [r["total_seconds"] for r in rs]
        out["methods"][method] = entry
    return out


def summary_markdown(summary: dict[str, Any], title: str = "PreLort comparison") -> str:
    """Methods x rank levels tables, mean ± std over seeds, best per column in bold."""
    methods = list(summary["methods"])
    levels = [str(lv) for lv in summary["levels"]]
    first = summary["methods"][methods[0]]
    metrics = list(first["per_rank"][levels[0]].keys())
    lines = [
        f"# {title}",
        "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Final round, global adapter "
        "truncated at each rank level (the rule's rank-r downlink). Best per column in **bold**.",
        "",
    ]
    for m in metrics:
        better = "lower" if m in LOWER_IS_BETTER else "higher"
        lines += [f"## {m} ({better} is better)", ""]
        cols = [*levels, "AUC"]
        lines.append("| method | " + " | ".join(f"r={c}" if c != "AUC" else c for c in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        best: dict[str, float] = {}
        for c in cols:
            vals = [_cell(summary["methods"][mt], c, m)[0] for mt in methods]
            best[c] = min(vals) if better == "lower" else max(vals)
        for mt in methods:
            cells = []
            for c in cols:
                mean, std = _cell(summary["methods"][mt], c, m)
                text = f"{mean:.4g} ± {std:.2g}"
                cells.append(f"**{text}**" if mean == best[c] else text)
            lines.append(f"| {mt} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## communication (bytes per run, mean over seeds)",
        "",
        "| method | up | down |",
        "|---|---:|---:|",
    ]
    for mt in methods:
        e = summary["methods"][mt]
        lines.append(
            f"| {mt} | {sum(e['bytes_up']) / len(e['bytes_up']):.4g} | "
            f"{sum(e['bytes_down']) / len(e['bytes_down']):.4g} |"
        )
    lines.append("")
    return "\n".join(lines)


def _cell(entry: dict[str, Any], col: str, metric: str) -> tuple[float, float]:
    src = entry["auc"][metric] if col == "AUC" else entry["per_rank"][col][metric]
    return float(src["mean"]), float(src["std"])


def plot_summary(summary: dict[str, Any], runs: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """PNG plots: each metric vs rank per method, and vs round at r_min and r_max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths: list[Path] = []
    levels = [str(lv) for lv in summary["levels"]]
    methods = list(summary["methods"])
    metrics = list(summary["methods"][methods[0]]["per_rank"][levels[0]].keys())
    for m in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        for mt in methods:
            pr = summary["methods"][mt]["per_rank"]
            ys = [pr[lv][m]["mean"] for lv in levels]
            es = [pr[lv][m]["std"] for lv in levels]
            ax.errorbar([int(lv) for lv in levels], ys, yerr=es, marker="o", capsize=3, label=mt)
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(lv) for lv in levels], levels)
        ax.set_xlabel("rank of the truncated global adapter")
        ax.set_ylabel(m)
        ax.set_title(f"{m} vs rank (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{m}_vs_rank.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, lv in zip(axes, [levels[0], levels[-1]], strict=True):
            for mt in methods:
                curves: dict[int, list[float]] = {}
                for r in runs:
                    if r["method"] != mt:
                        continue
                    for rec in r["rounds"]:
                        if "per_rank" in rec:
                            curves.setdefault(rec["round"], []).append(rec["per_rank"][lv][m])
                xs = sorted(curves)
                ax.plot(xs, [sum(curves[x]) / len(curves[x]) for x in xs], marker=".", label=mt)
            ax.set_title(f"{m} at rank {lv}")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(m)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{m}_vs_round.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
