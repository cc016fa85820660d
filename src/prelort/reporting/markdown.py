"""Markdown report of a ``summarise`` summary: per-family tables, compute, paired differences, verdicts."""

from __future__ import annotations

from typing import Any

from prelort.reporting.statistics import lower_is_better
from prelort.reporting.summary import (
    REFERENCE,
    compute_means,
    grouped_methods,
    oracle_of,
    paired_differences,
    summary_metrics,
    verdict_table,
)

FAMILY_TITLES = {
    "rank-limited": "Rank-limited adapters",
    "merged": "Merged models",
    "homogeneous": "Homogeneous references",
}

FAMILY_NOTES = {
    "rank-limited": (
        "Column r is the global adapter truncated to its first r rank dimensions "
        "(FlexLoRA: its rank-r SVD truncation; RB-LoRA likewise)."
    ),
    "merged": (
        "FLoRA and FLoRIST merge every round's update into the base weights, and Fed-PLoRA folds "
        "the modules a client does not train into them, so a rank-r client's model is the "
        "merged (folded) full-rank model, identical at every level."
    ),
    "homogeneous": (
        "FedIT with every client at one rank (fedit: r_min, fedit-max: r_max), its global adapter "
        "truncated to r; an oracle fedit-rN is reported only in column r=N (blank elsewhere): "
        "its number is the rank-N FedAvg model trained by all clients with all data."
    ),
}


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _cell(entry: dict[str, Any], col: str, metric: str) -> tuple[float, float] | None:
    src = entry["auc"].get(metric) if col == "AUC" else entry["per_rank"].get(col, {}).get(metric)
    if src is None:
        return None
    return float(src["mean"]), float(src["std"])


def summary_markdown(summary: dict[str, Any], title: str = "PreLort comparison") -> str:
    """Markdown report: per metric, one methods x rank levels table per family (mean ± std over
    seeds, best per column within a family in bold), compute and communication, and, when
    PreLort ran, its paired differences against the rank-limited baselines and the verdicts."""
    levels = [str(lv) for lv in summary["levels"]]
    metrics = summary_metrics(summary)
    groups = grouped_methods(summary)
    lines = [
        f"# {title}",
        "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Final round, evaluated at each rank level r. "
        "Mean ± std over seeds; best per column within a family in **bold**.",
        "",
        "## Method families",
        "",
    ]
    for fam, ms in groups:
        lines += [f"### {FAMILY_TITLES.get(fam, fam)}", ""]
        note = FAMILY_NOTES.get(fam, "")
        lines += [f"{note} Methods: {', '.join(ms)}.".strip(), ""]
    for m in metrics:
        better = "lower" if lower_is_better(m) else "higher"
        lines += [f"## {m} ({better} is better)", ""]
        cols = [*levels, "AUC"]
        for fam, ms in groups:
            lines += [f"### {m}: {FAMILY_TITLES.get(fam, fam).lower()}", ""]
            lines.append("| method | " + " | ".join(f"r={c}" if c != "AUC" else c for c in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            best: dict[str, float] = {}
            for c in cols:
                vals = [cell[0] for mt in ms if (cell := _cell(summary["methods"][mt], c, m)) is not None]
                if vals:
                    best[c] = min(vals) if better == "lower" else max(vals)
            for mt in ms:
                cells = []
                for c in cols:
                    cell = _cell(summary["methods"][mt], c, m)
                    if cell is None:
                        cells.append("")
                        continue
                    text = f"{cell[0]:.4g} ± {cell[1]:.2g}"
                    cells.append(f"**{text}**" if cell[0] == best.get(c) and len(ms) > 1 else text)
                label = f"{mt} (oracle)" if oracle_of(summary, mt) is not None else mt
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += _compute_markdown(summary, groups)
    if "paired" in summary or REFERENCE in summary["methods"]:
        paired = summary.get("paired") or paired_differences(summary)
        verdict = summary.get("verdict") or verdict_table(summary, paired["reference"])
        lines += _paired_markdown(paired, levels, metrics)
        lines += _verdict_markdown(verdict, metrics)
    return "\n".join(lines)


def _compute_markdown(summary: dict[str, Any], groups: list[tuple[str, list[str]]]) -> list[str]:
    lines = [
        "## Compute and communication (per run, mean over seeds)",
        "",
        "Passes: forward/backward passes summed over all clients and rounds; examples: training "
        "examples seen; bytes: adapter payloads uploaded by / sent to all clients.",
        "",
        "| method | family | passes | examples | bytes up | bytes down | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for fam, ms in groups:
        for mt in ms:
            e = summary["methods"][mt]
            comp = e.get("compute")
            if comp is None:  # summaries written before the compute block
                comp = compute_means(e)
            lines.append(
                f"| {mt} | {fam} | {_fmt(comp['passes'])} | {_fmt(comp['examples'])} | "
                f"{_fmt(comp['bytes_up'])} | {_fmt(comp['bytes_down'])} | {_fmt(comp['seconds'], '.3g')} |"
            )
    lines.append("")
    return lines


def _ci_text(stats: dict[str, Any]) -> str:
    if stats["ci_low"] is None:
        return "–"
    return f"[{stats['ci_low']:+.3g}, {stats['ci_high']:+.3g}]"


def _wtl(stats: dict[str, Any]) -> str:
    return f"{stats['wins']}/{stats['ties']}/{stats['losses']}"


def _paired_markdown(paired: dict[str, Any], levels: list[str], metrics: list[str]) -> list[str]:
    ref = paired["reference"]
    if not paired["baselines"]:
        return []
    lines = [
        f"## Paired differences: {ref} minus each rank-limited baseline",
        "",
        f"Per seed d = {ref} − baseline on the same seed (only seeds both ran); mean d with its "
        f"{paired['confidence']:.0%} Student-t interval (df = n − 1); W/T/L = seeds where {ref} is "
        "better / tied / worse in the metric's direction.",
        "",
    ]
    for m in metrics:
        rows = [
            (b, lv, paired["differences"][b][lv][m])
            for b in paired["baselines"]
            for lv in levels
            if m in paired["differences"].get(b, {}).get(lv, {})
        ]
        if not rows:
            continue
        better = "lower" if lower_is_better(m) else "higher"
        lines += [
            f"### {m} ({better} is better)",
            "",
            "| baseline | r | mean d | 95% CI | n | W/T/L |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for b, lv, s in rows:
            lines.append(f"| {b} | {lv} | {s['mean_diff']:+.4g} | {_ci_text(s)} | {s['n']} | {_wtl(s)} |")
        lines.append("")
    return lines


def _verdict_markdown(verdict: dict[str, Any], metrics: list[str]) -> list[str]:
    ref = verdict["reference"]
    if not verdict["levels"]:
        return []
    lines = [
        f"## Verdict: {ref} minus the best rank-limited baseline per level",
        "",
        "Best baseline: best mean at that level in the metric's direction. win / loss: the 95% "
        f"interval excludes 0 in / against {ref}'s favour; tie (within noise) otherwise.",
        "",
        "| r | metric | best baseline | baseline mean | "
        + ref
        + " mean | mean d | 95% CI | n | W/T/L | verdict |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv, rows in verdict["levels"].items():
        for m in metrics:
            if m not in rows:
                continue
            s = rows[m]
            lines.append(
                f"| {lv} | {m} | {s['baseline']} | {s['baseline_mean']:.4g} | {s['reference_mean']:.4g} | "
                f"{s['mean_diff']:+.4g} | {_ci_text(s)} | {s['n']} | {_wtl(s)} | {s['verdict']} |"
            )
    lines.append("")
    return lines
