"""Console tables."""

from __future__ import annotations

from typing import Any


def per_rank_table(results: dict[str, Any], title: str | None = None) -> Any:
    """A rich Table: one row per rank level, before (round 0) and after training."""
    from rich.table import Table

    before = results["rounds"][0]["per_rank"]
    after = results["final"]["per_rank"]
    metrics = list(next(iter(after.values())).keys())
    table = Table(title=title or f"{results['method']} (seed {results['seed']}): per-rank metrics")
    table.add_column("rank", justify="right")
    for m in metrics:
        table.add_column(f"{m} before", justify="right")
        table.add_column(f"{m} after", justify="right")
    for level, vals in after.items():
        row = [level]
        for m in metrics:
            row += [_fmt(before[level].get(m)), _fmt(vals.get(m))]
        table.add_row(*row)
    return table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
