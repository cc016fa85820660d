"""Results files, tables and plots."""

from prelort.reporting.files import atomic_write_text, write_results
from prelort.reporting.summary import LOWER_IS_BETTER, summarise, summary_markdown
from prelort.reporting.tables import per_rank_table

__all__ = [
    "LOWER_IS_BETTER",
    "atomic_write_text",
    "per_rank_table",
    "summarise",
    "summary_markdown",
    "write_results",
]
