"""The interface every aggregation rule implements, and the types that cross it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prelort.adapters.state import Adapter, LoRAPair, Scaling

Order = Literal["ownership", "round", "export"]
Split = Literal["b", "balanced"]


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns: its trained prefix adapter at ``rank`` and its data size n_k."""

    adapter: Adapter
    rank: int
    num_examples: int
    client_id: int | None = None


@dataclass(frozen=True)
class AggregationResult:
    """The new global adapter at rank R, and weight deltas merged into the base (FLoRA)."""

    adapter: Adapter
    base_delta: dict[str, torch.Tensor] | None = None
    broadcast_bytes: int = 0
    """Extra bytes every client must download next round (FLoRA's stacked factors)."""
    info: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleOptions:
    """Settings a rule may need: the LoRA scale s(r) and a generator for fresh factors.

    With ``seed`` set, ``server_update`` gives every round its own generator seeded by
    (seed, round), so a resumed run draws exactly what an uninterrupted one would.
    ``server_update`` also sets ``round`` (the round being aggregated), so a rule whose
    per-client choices derive from (seed, round, client) (Fed-PLoRA's module selection) can
    map each update back; ``energy_threshold`` is FLoRIST's singular-value energy share tau.
    ``order`` is the rank-dimension order of the segment-wise rules (``importance.py``):
    ``ownership`` (as averaged), ``round`` (importance order after every aggregation) or
    ``export`` (the state keeps ownership order; evaluation and export see importance order);
    ``split`` how the re-ordered spectrum is shared between A and B.
    """

    scaling: Scaling | None = None
    generator: torch.Generator | None = None
    seed: int | None = None
    round: int | None = None
    energy_threshold: float = 0.9
    order: Order = "ownership"
    split: Split = "balanced"

    def scale(self, r: int) -> float:
        return 1.0 if self.scaling is None else self.scaling(r)


@dataclass(frozen=True)
class Fold:
    """A per-client weight delta added to the frozen base weights before local training.

    ``delta`` maps module names to ``out x in`` tensors on top of the global base delta (if any);
    ``num_bytes`` is what it costs to send: for Fed-PLoRA the client computes the fold itself
    from the unselected one-rank modules, so it costs their factors, not the dense matrices.
    """

    delta: dict[str, torch.Tensor]
    num_bytes: int


class AggregationRule:
    """Base class: ``aggregate`` builds the new global adapter, ``downlink`` what a client gets.

    The default downlink is the rank-r prefix (A[:r], B[:, :r]) of the global adapter, with no
    ``fold``.
    """

    name: ClassVar[str] = ""

    def __init__(self, options: RuleOptions | None = None) -> None:
        self.options = options or RuleOptions()

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        raise NotImplementedError

    def downlink(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Adapter:
        """What client ``client_id`` of rank ``rank`` receives in round ``round_``.

        Without a client id (evaluation, export) it is what a rank-r client holds: together
        with ``fold`` it is exactly the model that per-rank evaluation scores at level r.
        """
        return {name: pair.truncate(rank).clone() for name, pair in global_adapter.items()}

    def fold(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Fold | None:
        """Weight delta the client adds to its frozen base weights with this downlink (default:
        none). The transports add it before the client trains and remove it afterwards."""
        return None

    def finish_sums(self, adapter: Adapter) -> Adapter:
        """Post-processing of the adapter a sum round computed from summed messages
        (secure aggregation / DP; docs/design.md §4.9). Default: none."""
        return adapter


RULES: dict[str, type[AggregationRule]] = {}


def register(name: str) -> Callable[[type[AggregationRule]], type[AggregationRule]]:
    """Class decorator adding a rule to the registry under ``name``."""

    def wrap(cls: type[AggregationRule]) -> type[AggregationRule]:
        if name in RULES:
            raise ValueError(f"aggregation rule {name!r} registered twice")
        RULES[name] = cls
        return cls

    return wrap


def get_rule(name: str, options: RuleOptions | None = None) -> AggregationRule:
    """Instantiate the registered rule ``name``."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {name!r}; choose one of {', '.join(sorted(RULES))}"
        ) from None
    return cls(options)


def check_updates(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> int:
    """Check module names and shapes of every update against the global adapter; return R."""
    if not updates:
        raise ValueError("aggregation needs at least one client update")
    ranks = {pair.rank for pair in global_adapter.values()}
    if len(ranks) != 1:
        raise ValueError(f"global adapter modules have different ranks {sorted(ranks)}")
    max_rank = ranks.pop()
    for u in updates:
        if set(u.adapter) != set(global_adapter):
            raise ValueError(f"client {u.client_id}: update modules differ from the global adapter")
        if not 0 < u.rank <= max_rank:
            raise ValueError(f"client {u.client_id}: rank {u.rank} outside 1..{max_rank}")
        if u.num_examples <= 0:
            raise ValueError(f"client {u.client_id}: num_examples must be positive")
        for name, pair in u.adapter.items():
            g = global_adapter[name]
            if pair.A.shape != (u.rank, g.A.shape[1]) or pair.B.shape != (g.B.shape[0], u.rank):
                raise ValueError(
                    f"client {u.client_id}: module {name} has A{tuple(pair.A.shape)} B{tuple(pair.B.shape)}, "
                    f"expected rank {u.rank} factors of A{tuple(g.A.shape)} B{tuple(g.B.shape)}"
                )
    return max_rank


def data_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """FedAvg weights p_k = n_k / sum_j n_j (float64)."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def weighted_delta(
    updates: Sequence[ClientUpdate], name: str, weights: torch.Tensor, options: RuleOptions
) -> torch.Tensor:
    """sum_k p_k s(r_k) B_k A_k for module ``name`` (float64 accumulation)."""
    total: torch.Tensor | None = None
    for w, u in zip(weights.tolist(), updates, strict=True):
        pair: LoRAPair = u.adapter[name]
        term = pair.delta(w * options.scale(u.rank))
        total = term if total is None else total + term
    assert total is not None
    return total
