"""Aggregation rules, one file each, behind one registry.

``aggregate(rule, global_adapter, updates)`` is the public entry point (docs/design.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, Scaling
from prelort.aggregation import (
    fed_plora,
    fedit,
    flexlora,
    flora,
    florist,
    hetlora,
    prelort,
    raflora,
    rb_lora,
    segment,
)
from prelort.aggregation.base import (
    RULES,
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    RuleOptions,
    get_rule,
)

__all__ = [
    "RULES",
    "AggregationResult",
    "AggregationRule",
    "ClientUpdate",
    "RuleOptions",
    "aggregate",
    "fed_plora",
    "fedit",
    "flexlora",
    "flora",
    "florist",
    "get_rule",
    "hetlora",
    "prelort",
    "raflora",
    "rb_lora",
    "segment",
]


def aggregate(
    rule: str,
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    *,
    scaling: Scaling | None = None,
    generator: torch.Generator | None = None,
) -> AggregationResult:
    """Aggregate client updates with the registered rule ``rule``.

    Returns an object with ``.adapter`` (the new global adapter at rank R) and
    ``.base_delta`` (merged weight deltas, or None). ``scaling`` gives s(r) for the rules
    that form products B A (flexlora, flora, hetlora's weights); None means s = 1.
    """
    options = RuleOptions(scaling=scaling, generator=generator)
    return get_rule(rule, options).aggregate(global_adapter, updates)
