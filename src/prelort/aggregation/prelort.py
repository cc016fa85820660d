"""PreLort's server rule: segment-wise aggregation of prefix-nested client adapters.

The aggregation is exactly ``segment`` (docs/design.md §4.2); what makes the method PreLort is the
prefix-nested local training (``prelort.training``) that the method table pairs it with.
"""

from __future__ import annotations

from collections.abc import Sequence

from prelort.adapters.state import Adapter
from prelort.aggregation.base import AggregationResult, AggregationRule, ClientUpdate, register
from prelort.aggregation.segment import segment_average


@register("prelort")
class PreLort(AggregationRule):
    """Segment-wise averaging (clients train prefix-nested adapters)."""

    name = "prelort"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        return AggregationResult(segment_average(global_adapter, updates))
