"""Matplotlib plots of a ``summarise`` summary: metric vs rank, vs round, and paired differences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prelort.reporting.statistics import lower_is_better
from prelort.reporting.summary import (
    REFERENCE,
    family_of,
    grouped_methods,
    oracle_of,
    paired_differences,
    summary_metrics,
)


def _style(summary: dict[str, Any], method: str, index: int) -> dict[str, Any]:
    """Line style by family: rank-limited solid circles, merged dashed squares, homogeneous dotted grey."""
    fam = family_of(summary, method)
    if fam == "merged":
        return {"linestyle": "--", "marker": "s"}
    if fam == "homogeneous":
        grey = ("0.35", "0.55", "0.7", "0.2")[index % 4]
        if oracle_of(summary, method) is not None:
            return {"linestyle": "none", "marker": "*", "markersize": 11, "color": grey}
        return {"linestyle": ":", "marker": "^", "color": grey}
    return {"linestyle": "-", "marker": "o"}


def plot_summary(summary: dict[str, Any], runs: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """PNG plots: each metric vs rank per method (styled by family; oracles as single markers at
    their level), vs round at r_min and r_max, and, when PreLort ran, its paired difference to each
    rank-limited baseline per level with 95% error bars (``{metric}_paired_diff.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    levels = [str(lv) for lv in summary["levels"]]
    ordered = [mt for _, ms in grouped_methods(summary) for mt in ms]
    homog = [mt for mt in ordered if family_of(summary, mt) == "homogeneous"]
    styles = {mt: _style(summary, mt, homog.index(mt) if mt in homog else 0) for mt in ordered}
    labels = {mt: f"{mt} (oracle)" if oracle_of(summary, mt) is not None else mt for mt in ordered}
    for m in summary_metrics(summary):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mt in ordered:
            pr = summary["methods"][mt]["per_rank"]
            lvs = [lv for lv in levels if m in pr.get(lv, {})]
            if not lvs:
                continue
            ys = [pr[lv][m]["mean"] for lv in lvs]
            es = [pr[lv][m]["std"] for lv in lvs]
            ax.errorbar([int(lv) for lv in lvs], ys, yerr=es, capsize=3, label=labels[mt], **styles[mt])
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(lv) for lv in levels], levels)
        ax.set_xlabel("rank level r")
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
            for mt in ordered:
                olv = oracle_of(summary, mt)
                if olv is not None and str(olv) != lv:
                    continue
                curves: dict[int, list[float]] = {}
                for r in runs:
                    if r["method"] != mt:
                        continue
                    for rec in r.get("rounds", []):
                        val = rec.get("per_rank", {}).get(lv, {}).get(m)
                        if val is not None:
                            curves.setdefault(rec["round"], []).append(val)
                xs = sorted(curves)
                if not xs:
                    continue
                style = {**styles[mt], "marker": "."}
                if styles[mt]["linestyle"] == "none":  # an oracle: a dash-dot line with stars
                    style.update(linestyle="-.", marker="*", markersize=7)
                ax.plot(xs, [sum(curves[x]) / len(curves[x]) for x in xs], label=labels[mt], **style)
            ax.set_title(f"{m} at rank {lv}")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(m)
        handles: dict[str, Any] = {}
        for ax in axes:  # an oracle may be drawn on one panel only
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        labelled = [lb for lb in (labels[mt] for mt in ordered) if lb in handles]
        axes[1].legend([handles[lb] for lb in labelled], labelled, fontsize=8)
        fig.tight_layout()
        p = out / f"{m}_vs_round.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    paths += _plot_paired(summary, out, plt)
    return paths


def _plot_paired(summary: dict[str, Any], out: Path, plt: Any) -> list[Path]:
    if REFERENCE not in summary["methods"]:
        return []
    paired = summary.get("paired") or paired_differences(summary)
    ref = paired["reference"]
    baselines = paired["baselines"]
    if not baselines:
        return []
    levels = [str(lv) for lv in summary["levels"]]
    paths: list[Path] = []
    for m in summary_metrics(summary):
        rows = [(b, lv) for b in baselines for lv in levels if m in paired["differences"][b].get(lv, {})]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.6 / max(len(baselines), 1)
        for i, b in enumerate(baselines):
            xs, ys, errs = [], [], []
            for j, lv in enumerate(levels):
                s = paired["differences"][b].get(lv, {}).get(m)
                if s is None:
                    continue
                xs.append(j + (i - (len(baselines) - 1) / 2) * width)
                ys.append(s["mean_diff"])
                errs.append(s["ci_half_width"] or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", linestyle="none", capsize=4, label=f"{ref} − {b}")
        ax.axhline(0.0, color="black", linewidth=1)
        ax.set_xticks(range(len(levels)), [f"r={lv}" for lv in levels])
        ax.set_xlim(-0.5, len(levels) - 0.5)
        better = "lower" if lower_is_better(m) else "higher"
        ax.set_ylabel(f"Δ {m} ({better} is better for {ref})")
        ax.set_title(f"{ref} minus rank-limited baselines: {m} (paired, 95% t-interval)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{m}_paired_diff.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
