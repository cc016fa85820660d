"""Results files, tables and plots."""

from prelort.reporting.files import atomic_write_text, write_results
from prelort.reporting.markdown import summary_markdown
from prelort.reporting.plots import plot_summary
from prelort.reporting.statistics import LOWER_IS_BETTER
from prelort.reporting.summary import (
    FAMILIES,
    method_family,
    paired_differences,
    summarise,
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
