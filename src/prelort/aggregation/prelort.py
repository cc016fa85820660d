"""PreLort's server rule: segment-wise aggregation of prefix-nested client adapters.

The aggregation is exactly ``segment`` (docs/design.md §4.2), with its rank-dimension order
option; what makes the method PreLort is the prefix-nested local training (``prelort.training``)
that the method table pairs it with.
"""

from __future__ import annotations

from prelort.aggregation.base import register
from prelort.aggregation.segment import SegmentWise


@register("prelort")
class PreLort(SegmentWise):
    """Segment-wise averaging (clients train prefix-nested adapters)."""

    name = "prelort"
