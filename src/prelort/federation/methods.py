"""The methods a run can use: an aggregation rule plus what clients do locally.

One table, no dispatch on names elsewhere: the simulator and the Flower app read the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    """How a method trains and aggregates."""

    name: str
    rule: str
    """Aggregation rule in ``prelort.aggregation.RULES``."""
    nested: bool = False
    """Prefix-nested local training (PreLort)."""
    self_prune: bool = False
    """HetLoRA's local rank self-pruning with its regulariser."""
    homogeneous: Literal["min", "max"] | None = None
    """FedIT: every client at the smallest or largest level instead of its own rank."""
    summary: str = ""


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "prelort",
            "prelort",
            nested=True,
            summary="segment-wise aggregation + prefix-nested training",
        ),
        MethodSpec("segment", "segment", summary="segment-wise aggregation, plain local training"),
        MethodSpec("hetlora", "hetlora", self_prune=True, summary="HetLoRA (Cho et al. 2024)"),
        MethodSpec("flexlora", "flexlora", summary="FlexLoRA (Bai et al. 2024)"),
        MethodSpec("flora", "flora", summary="FLoRA (Wang et al. 2024)"),
        MethodSpec("fedit", "fedit", homogeneous="min", summary="FedIT, every client at r_min"),
        MethodSpec("fedit-max", "fedit", homogeneous="max", summary="FedIT, every client at r_max"),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
