"""Summaries over methods and seeds: JSON, Markdown and plots.

``summarise(runs)`` aggregates ``results.json`` dicts per method (mean ± std per rank level, AUC,
compute and communication), groups the methods by family and, when ``"prelort"`` is present,
adds paired-by-seed differences against every rank-limited baseline (``paired_differences``)
and a per-level verdict against the best of them (``verdict_table``).
``summary_markdown`` and ``plot_summary`` render that summary.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = {"loss", "rel_loss", "perplexity"}

FAMILIES: tuple[str, ...] = ("rank-limited", "merged", "homogeneous")
"""Method families, in report order."""

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

REFERENCE = "prelort"
CONFIDENCE = 0.95
TIE_TOLERANCE = 1e-12

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf, 8 decimals).
_T975 = (
    12.70620474,
    4.30265273,
    3.18244631,
    2.77644511,
    2.57058184,
    2.44691185,
    2.36462425,
    2.30600414,
    2.26215716,
    2.22813885,
    2.20098516,
    2.17881283,
    2.16036866,
    2.14478669,
    2.13144955,
    2.11990530,
    2.10981558,
    2.10092204,
    2.09302405,
    2.08596345,
    2.07961384,
    2.07387307,
    2.06865761,
    2.06389856,
    2.05953855,
    2.05552944,
    2.05183052,
    2.04840714,
    2.04522964,
    2.04227246,
)

_ORACLE = re.compile(r"^fedit-r(\d+)$")


def method_family(method: str) -> str:
    """Family of a method from its name: the method table's, else fedit* homogeneous, others
    rank-limited (results written before a method was added carry no family)."""
    from prelort.federation.methods import get_method

    try:
        return get_method(method).family
    except ValueError:
        return "homogeneous" if method.startswith("fedit") else "rank-limited"


def oracle_level(method: str) -> int | None:
    """N for an oracle method name ``fedit-rN``, else None."""
    m = _ORACLE.match(method)
    return int(m.group(1)) if m else None


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile t_{0.975, df} (scipy if importable, else a table; 1.96 past 30)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(student_t.ppf(0.975, df))


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (loss, rel_loss, perplexity)."""
    return metric in LOWER_IS_BETTER


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


def _run_total(run: dict[str, Any], total_key: str, round_key: str) -> float | None:
    """``run[total_key]``, else the sum of the round records' ``round_key``, else None."""
    if run.get(total_key) is not None:
        return float(run[total_key])
    rounds = run.get("rounds") or []
    if rounds and all(rec.get(round_key) is not None for rec in rounds):
        return float(sum(rec[round_key] for rec in rounds))
    return None


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(runs: list[dict[str, Any]], reference: str = REFERENCE) -> dict[str, Any]:
    """Aggregate results dicts by method, group by family, add paired differences and verdicts.

    Per method: ``family``, ``oracle_level``, ``seeds`` (run order, aligned with every
    ``values`` list), ``per_rank[level][metric]`` and ``auc[metric]`` as mean/std/values,
    per-run ``bytes_up``/``bytes_down``/``seconds``/``passes``/``examples`` and their means in
    ``compute``. An oracle (``fedit-rN``) keeps only level N and has no AUC. Top level: ``levels``,
    ``seeds``, ``metrics``, ``families`` (family -> methods) and, when ``reference`` ran,
    ``paired`` (``paired_differences``) and ``verdict`` (``verdict_table``).
    """
    if not runs:
        raise ValueError("summarise needs at least one results dict")
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    all_levels = sorted({int(lv) for r in runs for lv in r.get("levels") or r["final"]["per_rank"]})
    out: dict[str, Any] = {
        "methods": {},
        "levels": all_levels,
        "seeds": sorted({r["seed"] for r in runs}),
        "metrics": [],
        "families": {},
    }
    metrics_seen: list[str] = []
    for method, rs in by_method.items():
        family = rs[0].get("family") or method_family(method)
        olevel = rs[0].get("oracle_level")
        if olevel is None and family == "homogeneous":
            olevel = oracle_level(method)
        common = set.intersection(*(set(r["final"]["per_rank"]) for r in rs))
        if olevel is not None:
            common &= {str(olevel)}
        levels = sorted(common, key=int)
        metrics = list(rs[0]["final"]["per_rank"][levels[0]].keys()) if levels else []
        metrics_seen += [m for m in metrics if m not in metrics_seen]
        entry: dict[str, Any] = {
            "family": family,
            "oracle_level": int(olevel) if olevel is not None else None,
            "seeds": [r["seed"] for r in rs],
            "per_rank": {},
            "auc": {},
        }
        for lv in levels:
            entry["per_rank"][lv] = {}
            for m in metrics:
                vals = [float(r["final"]["per_rank"][lv][m]) for r in rs]
                mean, std = _mean_std(vals)
                entry["per_rank"][lv][m] = {"mean": mean, "std": std, "values": vals}
        if olevel is None:
            for m in metrics:
                vals = [
                    area_under_rank_curve({lv: r["final"]["per_rank"][lv] for lv in levels}, m) for r in rs
                ]
                mean, std = _mean_std(vals)
                entry["auc"][m] = {"mean": mean, "std": std, "values": vals}
        entry["bytes_up"] = [r.get("total_bytes_up") for r in rs]
        entry["bytes_down"] = [r.get("total_bytes_down") for r in rs]
        entry["seconds"] = [r.get("total_seconds") for r in rs]
        entry["passes"] = [_run_total(r, "total_passes", "passes") for r in rs]
        entry["examples"] = [_run_total(r, "total_examples", "examples") for r in rs]
        entry["compute"] = {
            k: _mean_or_none([float(v) for v in entry[k] if v is not None])
            for k in ("passes", "examples", "bytes_up", "bytes_down", "seconds")
        }
        out["methods"][method] = entry
    out["metrics"] = metrics_seen
    out["families"] = {
        fam: [m for m, e in out["methods"].items() if e["family"] == fam]
        for fam in [*FAMILIES, *sorted({e["family"] for e in out["methods"].values()} - set(FAMILIES))]
    }
    out["families"] = {k: v for k, v in out["families"].items() if v}
    if reference in out["methods"]:
        out["paired"] = paired_differences(out, reference)
        out["verdict"] = verdict_table(out, reference)
    return out


def _family(summary: dict[str, Any], method: str) -> str:
    fam = summary["methods"][method].get("family")
    return str(fam) if fam else method_family(method)


def _oracle(summary: dict[str, Any], method: str) -> int | None:
    entry = summary["methods"][method]
    if "oracle_level" in entry:
        return None if entry["oracle_level"] is None else int(entry["oracle_level"])
    return oracle_level(method) if _family(summary, method) == "homogeneous" else None


def _grouped_methods(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(family, methods) in report order; methods keep their summary order within a family."""
    methods = list(summary["methods"])
    fams = {m: _family(summary, m) for m in methods}
    order = [*FAMILIES, *sorted(set(fams.values()) - set(FAMILIES))]
    return [(f, [m for m in methods if fams[m] == f]) for f in order if any(fams[m] == f for m in methods)]


def _metrics(summary: dict[str, Any]) -> list[str]:
    if summary.get("metrics"):
        return list(summary["metrics"])
    seen: list[str] = []
    for e in summary["methods"].values():
        for per in e["per_rank"].values():
            seen += [m for m in per if m not in seen]
    return seen


def _seed_values(summary: dict[str, Any], method: str, level: str, metric: str) -> dict[Any, float] | None:
    """seed -> value for one cell (first run per seed); None if the cell or seed order is unknown."""
    entry = summary["methods"][method]
    cell = entry["per_rank"].get(level, {}).get(metric)
    if cell is None:
        return None
    values = cell["values"]
    seeds = entry.get("seeds")
    if seeds is None and len(summary.get("seeds", [])) == len(values):
        seeds = summary["seeds"]  # summaries written before per-method seeds: runs went seed by seed
    if seeds is None or len(seeds) != len(values):
        return None
    out: dict[Any, float] = {}
    for s, v in zip(seeds, values, strict=True):
        out.setdefault(s, float(v))
    return out


def _paired_stats(ref: dict[Any, float], base: dict[Any, float], lower: bool) -> dict[str, Any] | None:
    seeds = sorted(s for s in ref if s in base)
    if not seeds:
        return None
    diffs = [ref[s] - base[s] for s in seeds]
    n = len(diffs)
    mean, std = _mean_std(diffs)
    if n > 1:
        t = t_quantile(n - 1)
        half: float | None = t * std / math.sqrt(n)
        low: float | None = mean - t * std / math.sqrt(n)
        high: float | None = mean + t * std / math.sqrt(n)
    else:
        t, half, low, high = float("nan"), None, None, None
    wins = ties = losses = 0
    for d in diffs:
        if d == 0 or abs(d) <= TIE_TOLERANCE:
            ties += 1
        elif (d < 0) == lower:
            wins += 1
        else:
            losses += 1
    return {
        "better": "lower" if lower else "higher",
        "n": n,
        "seeds": seeds,
        "diffs": diffs,
        "mean_diff": mean,
        "std_diff": std,
        "t_quantile": t if n > 1 else None,
        "ci_half_width": half,
        "ci_low": low,
        "ci_high": high,
        "wins": wins,
        "ties": ties,
        "losses": losses,
    }


def paired_differences(summary: dict[str, Any], reference: str = REFERENCE) -> dict[str, Any]:
    """``reference`` minus each other rank-limited method, paired by seed, per level and metric.

    Returns ``{"reference", "confidence", "tie_tolerance", "baselines": [...], "differences":
    {baseline: {level: {metric: stats}}}}`` where stats holds ``better`` ("lower"/"higher"),
    ``n`` (seeds present in both), ``seeds``, ``diffs``, ``mean_diff``, ``std_diff``,
    ``t_quantile`` (df = n-1), ``ci_half_width``, ``ci_low``, ``ci_high`` (95% Student-t; None
    when n < 2) and ``wins``/``ties``/``losses`` (seeds where the reference is better / within
    ``TIE_TOLERANCE`` / worse in the metric's direction). Cells without a shared seed are left out.
    """
    if reference not in summary["methods"]:
        raise ValueError(f"reference method {reference!r} is not in the summary")
    baselines = [m for m in summary["methods"] if m != reference and _family(summary, m) == "rank-limited"]
    levels = [str(lv) for lv in summary["levels"]]
    diffs: dict[str, Any] = {}
    for b in baselines:
        per_level: dict[str, Any] = {}
        for lv in levels:
            per_metric: dict[str, Any] = {}
            for m in _metrics(summary):
                ref = _seed_values(summary, reference, lv, m)
                base = _seed_values(summary, b, lv, m)
                if ref is None or base is None:
                    continue
                stats = _paired_stats(ref, base, lower_is_better(m))
                if stats is not None:
                    per_metric[m] = stats
            if per_metric:
                per_level[lv] = per_metric
        diffs[b] = per_level
    return {
        "reference": reference,
        "confidence": CONFIDENCE,
        "tie_tolerance": TIE_TOLERANCE,
        "baselines": baselines,
        "differences": diffs,
    }


def _verdict_word(stats: dict[str, Any]) -> str:
    low, high = stats["ci_low"], stats["ci_high"]
    if low is None or high is None:
        return "inconclusive (n < 2)"
    lower = stats["better"] == "lower"
    if max(abs(low), abs(high)) <= TIE_TOLERANCE:
        return "tie (within noise)"
    if (high < 0) if lower else (low > 0):
        return "win"
    if (low > 0) if lower else (high < 0):
        return "loss"
    return "tie (within noise)"


def verdict_table(summary: dict[str, Any], reference: str = REFERENCE) -> dict[str, Any]:
    """Per level and metric: ``reference`` minus the best rank-limited baseline there.

    The best baseline is the one with the best mean over its seeds in the metric's direction
    (first in summary order on a tie). Returns ``{"reference", "confidence", "levels": {level:
    {metric: row}}}``; a row holds ``baseline``, ``baseline_mean``, ``reference_mean``, the
    paired stats of ``paired_differences`` and ``verdict``: "win" / "loss" when the 95% interval
    excludes 0 in / against the reference's favour, "tie (within noise)" otherwise,
    "inconclusive (n < 2)" with a single shared seed.
    """
    paired = summary.get("paired")
    if paired is None or paired.get("reference") != reference:
        paired = paired_differences(summary, reference)
    levels = [str(lv) for lv in summary["levels"]]
    out: dict[str, Any] = {}
    for lv in levels:
        rows: dict[str, Any] = {}
        for m in _metrics(summary):
            lower = lower_is_better(m)
            cands = [
                (float(summary["methods"][b]["per_rank"][lv][m]["mean"]), b)
                for b in paired["baselines"]
                if m in paired["differences"].get(b, {}).get(lv, {})
            ]
            if not cands:
                continue
            best_mean, best = (min if lower else max)(cands, key=lambda c: c[0])
            stats = paired["differences"][best][lv][m]
            rows[m] = {
                "baseline": best,
                "baseline_mean": best_mean,
                "reference_mean": float(summary["methods"][reference]["per_rank"][lv][m]["mean"]),
                **stats,
                "verdict": _verdict_word(stats),
            }
        if rows:
            out[lv] = rows
    return {"reference": reference, "confidence": CONFIDENCE, "levels": out}


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
    metrics = _metrics(summary)
    groups = _grouped_methods(summary)
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
                label = f"{mt} (oracle)" if _oracle(summary, mt) is not None else mt
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
                comp = {
                    k: _mean_or_none([float(v) for v in e.get(k, []) if v is not None])
                    for k in ("passes", "examples", "bytes_up", "bytes_down", "seconds")
                }
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


def _style(summary: dict[str, Any], method: str, index: int) -> dict[str, Any]:
    """Line style by family: rank-limited solid circles, merged dashed squares, homogeneous dotted grey."""
    fam = _family(summary, method)
    if fam == "merged":
        return {"linestyle": "--", "marker": "s"}
    if fam == "homogeneous":
        grey = ("0.35", "0.55", "0.7", "0.2")[index % 4]
        if _oracle(summary, method) is not None:
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
    ordered = [mt for _, ms in _grouped_methods(summary) for mt in ms]
    homog = [mt for mt in ordered if _family(summary, mt) == "homogeneous"]
    styles = {mt: _style(summary, mt, homog.index(mt) if mt in homog else 0) for mt in ordered}
    labels = {mt: f"{mt} (oracle)" if _oracle(summary, mt) is not None else mt for mt in ordered}
    for m in _metrics(summary):
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
                olv = _oracle(summary, mt)
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
    for m in _metrics(summary):
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
