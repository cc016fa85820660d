"""Results files, tables and plots."""

from prelort.reporting.files import atomic_write_text, write_results
from prelort.reporting.summary import (
    FAMILIES,
    LOWER_IS_BETTER,
    method_family,
    paired_differences,
    plot_summary,
    summarise,
    summary_markdown,
    verdict_table,
)
from prelort.reporting.tables import per_rank_table

__all__ = [
    "FAMILIES",
    "LOWER_IS_BETTER",
    "atomic_write_text",
    "method_family",
    "paired_differences",
    "per_rank_table",
    "plot_summary",
    "summarise",
    "summary_markdown",
    "verdict_table",
    "write_results",
]
