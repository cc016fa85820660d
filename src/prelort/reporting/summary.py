"""Summaries over methods and seeds.

``summarise(runs)`` aggregates ``results.json`` dicts per method (mean ± std per rank level, AUC,
compute and communication), groups the methods by family and, when ``"prelort"`` is present,
adds paired-by-seed differences against every rank-limited baseline (``paired_differences``)
and a per-level verdict against the best of them (``verdict_table``). ``prelort.reporting.markdown``
and ``prelort.reporting.plots`` render that summary.
"""

from __future__ import annotations

from typing import Any

from prelort.federation.methods import get_method, oracle_level
from prelort.reporting.statistics import (
    CONFIDENCE,
    TIE_TOLERANCE,
    area_under_rank_curve,
    interval_verdict,
    lower_is_better,
    mean_or_none,
    mean_std,
    paired_stats,
)

FAMILIES: tuple[str, ...] = ("rank-limited", "merged", "homogeneous")
"""Method families, in report order."""

REFERENCE = "prelort"
COMPUTE_KEYS = ("passes", "examples", "bytes_up", "bytes_down", "seconds")


def method_family(method: str) -> str:
    """Family of a method from its name: the method table's, else fedit* homogeneous, others
    rank-limited (results written before a method was added carry no family)."""
    try:
        return get_method(method).family
    except ValueError:
        return "homogeneous" if method.startswith("fedit") else "rank-limited"


def _run_total(run: dict[str, Any], total_key: str, round_key: str) -> float | None:
    """``run[total_key]``, else the sum of the round records' ``round_key``, else None."""
    if run.get(total_key) is not None:
        return float(run[total_key])
    rounds = run.get("rounds") or []
    if rounds and all(rec.get(round_key) is not None for rec in rounds):
        return float(sum(rec[round_key] for rec in rounds))
    return None


def compute_means(entry: dict[str, Any]) -> dict[str, float | None]:
    """Mean over runs of each of ``COMPUTE_KEYS`` in a method entry (None where no run has it)."""
    return {k: mean_or_none([float(v) for v in entry.get(k, []) if v is not None]) for k in COMPUTE_KEYS}


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
                mean, std = mean_std(vals)
                entry["per_rank"][lv][m] = {"mean": mean, "std": std, "values": vals}
        if olevel is None:
            for m in metrics:
                vals = [
                    area_under_rank_curve({lv: r["final"]["per_rank"][lv] for lv in levels}, m) for r in rs
                ]
                mean, std = mean_std(vals)
                entry["auc"][m] = {"mean": mean, "std": std, "values": vals}
        entry["bytes_up"] = [r.get("total_bytes_up") for r in rs]
        entry["bytes_down"] = [r.get("total_bytes_down") for r in rs]
        entry["seconds"] = [r.get("total_seconds") for r in rs]
        entry["passes"] = [_run_total(r, "total_passes", "passes") for r in rs]
        entry["examples"] = [_run_total(r, "total_examples", "examples") for r in rs]
        entry["compute"] = compute_means(entry)
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


def family_of(summary: dict[str, Any], method: str) -> str:
    """A summarised method's family: its entry's, else ``method_family`` of its name."""
    fam = summary["methods"][method].get("family")
    return str(fam) if fam else method_family(method)


def oracle_of(summary: dict[str, Any], method: str) -> int | None:
    """A summarised method's oracle level: its entry's, else from the name of a homogeneous one."""
    entry = summary["methods"][method]
    if "oracle_level" in entry:
        return None if entry["oracle_level"] is None else int(entry["oracle_level"])
    return oracle_level(method) if family_of(summary, method) == "homogeneous" else None


def grouped_methods(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(family, methods) in report order; methods keep their summary order within a family."""
    methods = list(summary["methods"])
    fams = {m: family_of(summary, m) for m in methods}
    order = [*FAMILIES, *sorted(set(fams.values()) - set(FAMILIES))]
    return [(f, [m for m in methods if fams[m] == f]) for f in order if any(fams[m] == f for m in methods)]


def summary_metrics(summary: dict[str, Any]) -> list[str]:
    """The summary's metrics in first-seen order (collected from the cells in old summaries)."""
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


def paired_differences(summary: dict[str, Any], reference: str = REFERENCE) -> dict[str, Any]:
    """``reference`` minus each other rank-limited method, paired by seed, per level and metric.

    Returns ``{"reference", "confidence", "tie_tolerance", "baselines": [...], "differences":
    {baseline: {level: {metric: stats}}}}`` where stats is ``statistics.paired_stats``: ``better``
    ("lower"/"higher"), ``n`` (seeds present in both), ``seeds``, ``diffs``, ``mean_diff``,
    ``std_diff``, ``t_quantile`` (df = n-1), ``ci_half_width``, ``ci_low``, ``ci_high`` (95%
    Student-t; None when n < 2) and ``wins``/``ties``/``losses``. Cells without a shared seed are
    left out.
    """
    if reference not in summary["methods"]:
        raise ValueError(f"reference method {reference!r} is not in the summary")
    baselines = [m for m in summary["methods"] if m != reference and family_of(summary, m) == "rank-limited"]
    levels = [str(lv) for lv in summary["levels"]]
    diffs: dict[str, Any] = {}
    for b in baselines:
        per_level: dict[str, Any] = {}
        for lv in levels:
            per_metric: dict[str, Any] = {}
            for m in summary_metrics(summary):
                ref = _seed_values(summary, reference, lv, m)
                base = _seed_values(summary, b, lv, m)
                if ref is None or base is None:
                    continue
                stats = paired_stats(ref, base, lower_is_better(m))
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


def verdict_table(summary: dict[str, Any], reference: str = REFERENCE) -> dict[str, Any]:
    """Per level and metric: ``reference`` minus the best rank-limited baseline there.

    The best baseline is the one with the best mean over its seeds in the metric's direction
    (first in summary order on a tie). Returns ``{"reference", "confidence", "levels": {level:
    {metric: row}}}``; a row holds ``baseline``, ``baseline_mean``, ``reference_mean``, the
    paired stats of ``paired_differences`` and ``verdict`` (``statistics.interval_verdict``).
    """
    paired = summary.get("paired")
    if paired is None or paired.get("reference") != reference:
        paired = paired_differences(summary, reference)
    levels = [str(lv) for lv in summary["levels"]]
    out: dict[str, Any] = {}
    for lv in levels:
        rows: dict[str, Any] = {}
        for m in summary_metrics(summary):
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
                "verdict": interval_verdict(stats),
            }
        if rows:
            out[lv] = rows
    return {"reference": reference, "confidence": CONFIDENCE, "levels": out}
