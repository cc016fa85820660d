"""The methods a run can use: an aggregation rule plus what clients do locally.

One table, no dispatch on names elsewhere: the run plan reads the spec. Pure Python (no
torch), so config validation can check method names without importing the numerics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Family = Literal["rank-limited", "merged", "homogeneous"]
Order = Literal["ownership", "round", "export"]


@dataclass(frozen=True)
class MethodSpec:
    """How a method trains and aggregates, and what its per-rank column means.

    ``family`` (docs/design.md §4): ``rank-limited`` methods evaluate a rank-r adapter at
    level r; ``merged`` (FLoRA, FLoRIST: merged into the base weights; Fed-PLoRA: the folded
    full model every client trains on) evaluates one full model, the same at every level;
    ``homogeneous`` (FedIT) trains every client at one rank and is a reference.
    """

    name: str
    rule: str
    """Aggregation rule in ``prelort.aggregation.RULES``."""
    family: Family = "rank-limited"
    nested: bool = False
    """Prefix-nested local training (PreLort)."""
    self_prune: bool = False
    """HetLoRA's local rank self-pruning with its regulariser."""
    homogeneous: Literal["min", "max", "level"] | None = None
    """FedIT: every client at the smallest, the largest or a given level (``level``)."""
    level: int | None = None
    """The common rank of a ``fedit-rN`` oracle."""
    order: Order = "ownership"
    """Rank-dimension order of a segment-wise rule when ``aggregation.order = "auto"``."""
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
        MethodSpec("flora", "flora", family="merged", summary="FLoRA (Wang et al. 2024)"),
        MethodSpec(
            "fed-plora",
            "fed-plora",
            family="merged",
            summary="Fed-PLoRA (Zhang et al. 2026): one-rank modules, Select-N-Fold",
        ),
        MethodSpec(
            "florist",
            "florist",
            family="merged",
            summary="FLoRIST (Ramesh and Dass 2026): stacked SVD, singular-value thresholding",
        ),
        MethodSpec(
            "rb-lora",
            "rb-lora",
            summary="RB-LoRA (Ha et al. 2026): rank-balanced weights, SVD projection",
        ),
        MethodSpec(
            "raflora",
            "raflora",
            summary="raFLoRA (Wu et al. 2026): rank partitions averaged over their contributors, SVD",
        ),
        MethodSpec(
            "fedit", "fedit", family="homogeneous", homogeneous="min", summary="FedIT, every client at r_min"
        ),
        MethodSpec(
            "fedit-max",
            "fedit",
            family="homogeneous",
            homogeneous="max",
            summary="FedIT, every client at r_max",
        ),
    )
}

_ORACLE = re.compile(r"fedit-r([1-9][0-9]*)")


def oracle_level(name: str) -> int | None:
    """N for the rank-N oracle ``fedit-rN`` (every client at rank N, all data), else None."""
    match = _ORACLE.fullmatch(name)
    return int(match.group(1)) if match else None


def get_method(name: str) -> MethodSpec:
    """The spec of a method name: a ``METHODS`` entry or an oracle ``fedit-rN``."""
    if name in METHODS:
        return METHODS[name]
    level = oracle_level(name)
    if level is not None:
        return MethodSpec(
            name,
            "fedit",
            family="homogeneous",
            homogeneous="level",
            level=level,
            summary=f"FedIT oracle, every client at rank {level}",
        )
    raise ValueError(
        f"unknown method {name!r}; choose one of {', '.join(METHODS)} or fedit-rN (N a rank level)"
    )
