"""Statistics of the comparisons: means, Student-t quantiles and paired-by-seed intervals."""

from __future__ import annotations

import itertools
import math
from typing import Any

LOWER_IS_BETTER = {"loss", "rel_loss", "perplexity"}
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation sqrt(sum (v - mean)^2 / (n - 1)); 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def mean_or_none(values: list[float]) -> float | None:
    """Mean of ``values``, None when empty."""
    return sum(values) / len(values) if values else None


def area_under_rank_curve(per_rank: dict[str, dict[str, float]], metric: str) -> float:
    """Normalised trapezoidal area under metric vs level index (mean height of the curve)."""
    ys = [per_rank[k][metric] for k in sorted(per_rank, key=int)]
    if len(ys) == 1:
        return ys[0]
    return sum((a + b) / 2 for a, b in itertools.pairwise(ys)) / (len(ys) - 1)


def paired_stats(ref: dict[Any, float], base: dict[Any, float], lower: bool) -> dict[str, Any] | None:
    """Paired differences d_s = ref(s) - base(s) over the seeds both have; None if there is none.

    ``mean_diff`` ± t_{0.975, n-1} sd(d) / sqrt(n) gives ``ci_low``/``ci_high`` (None when n < 2);
    ``wins``/``ties``/``losses`` count seeds where ref is better / within ``TIE_TOLERANCE`` / worse
    (``lower``: smaller is better).
    """
    seeds = sorted(s for s in ref if s in base)
    if not seeds:
        return None
    diffs = [ref[s] - base[s] for s in seeds]
    n = len(diffs)
    mean, std = mean_std(diffs)
    t: float | None = None
    half = low = high = None
    if n > 1:
        t = t_quantile(n - 1)
        half = t * std / math.sqrt(n)
        low, high = mean - half, mean + half
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
        "t_quantile": t,
        "ci_half_width": half,
        "ci_low": low,
        "ci_high": high,
        "wins": wins,
        "ties": ties,
        "losses": losses,
    }


def interval_verdict(stats: dict[str, Any]) -> str:
    """Verdict on a ``paired_stats`` interval: "win" / "loss" when it excludes 0 in / against the
    reference's favour, "tie (within noise)" otherwise, "inconclusive (n < 2)" without one."""
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
