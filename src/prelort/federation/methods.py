"""The methods a run can use: an aggregation rule plus what clients do locally.

One table, no dispatch on names elsewhere: the run plan reads the spec. Pure Python (no
torch), so config validation can check method names without importing the numerics.
"""

from __future__ import annotations

import re
import typing
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
    pinned_nesting: tuple[Literal["sample"], float] | None = None
    """(nested mode, own weight) this method always trains with, whatever ``[train]`` says
    (``prelort-literal``: the landed reading of issue #11, kept for comparison)."""
    summary: str = ""


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "prelort",
            "prelort",
            nested=True,
            order="round",
            summary="segment-wise aggregation in importance order + prefix-nested training",
        ),
        MethodSpec(
            "prelort-literal",
            "prelort",
            nested=True,
            order="ownership",
            pinned_nesting=("sample", 0.7),
            summary="the literal reading: segment-wise factor averaging + sample nesting, own weight 0.7",
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


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to ``METHODS`` (a plugin's method; its rule registered with
    ``prelort.aggregation.register``); ValueError if the name is taken."""
    if spec.name in METHODS or _ORACLE.fullmatch(spec.name):
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


_ORACLE = re.compile(r"fedit-r([1-9][0-9]*)")


def oracle_level(name: str) -> int | None:
    """N for the rank-N oracle ``fedit-rN`` (every client at rank N, all data), else None."""
    match = _ORACLE.fullmatch(name)
    return int(match.group(1)) if match else None


ORDER_RULES = ("prelort", "segment")
"""Rules with a rank-dimension order option (``aggregation.order``)."""


def resolve_order(spec: MethodSpec, configured: str) -> Order:
    """The rank-dimension order a run uses: ``aggregation.order``, or the method's own when it
    is ``auto``."""
    return spec.order if configured == "auto" else typing.cast(Order, configured)


NESTING_KEYS = frozenset({"train.nested_mode", "train.own_weight", "train.own_weight_final", "train.distill"})
ORDER_KEYS = frozenset({"aggregation.order", "aggregation.split"})
HETLORA_KEYS = frozenset({"hetlora.gamma", "hetlora.lam", "hetlora.min_rank"})
FLORIST_KEYS = frozenset({"florist.energy_threshold"})


def unused_keys(name: str) -> frozenset[str]:
    """Config keys (``section.key``) that method ``name`` never reads: the nesting keys for a
    method without (or with pinned) nesting, the order keys for a rule without an order,
    HetLoRA's and FLoRIST's keys for every other method. ``prelort compare`` may reuse a finished run whose
    stored config differs from the current one only there (``config.same_config``)."""
    spec = get_method(name)
    out: set[str] = set()
    if not spec.nested or spec.pinned_nesting is not None:
        out |= NESTING_KEYS
    if spec.rule not in ORDER_RULES:
        out |= ORDER_KEYS
    if not spec.self_prune:
        out |= HETLORA_KEYS
    if spec.rule != "florist":
        out |= FLORIST_KEYS
    return frozenset(out)


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
