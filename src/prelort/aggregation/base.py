"""The interface every aggregation rule implements, and the types that cross it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch

from prelort.adapters.state import Adapter, LoRAPair, Scaling, adapter_num_bytes, add_deltas

if TYPE_CHECKING:
    from prelort.adapters.nested import NestedLoRA

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
    section: Any = None
    """The rule's own config section (``AggregationRule.config_section``), validated by the
    config (``[hetlora]``, ``[florist]``)."""

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


RuleState = dict[str, torch.Tensor]
"""A rule's own server state (docs/design.md §6): named tensors that only the rule reads.
The driver, both transports, checkpoints and the CLI carry it without opening it."""


@dataclass(frozen=True)
class Downlink:
    """What one client receives in a round, as the rule builds it (``AggregationRule.message``).

    ``base`` is the weight delta the client adds to its frozen base weights W0 before it
    trains (FLoRA's merged updates, Fed-PLoRA's fold; None: W0 as it is); evaluation at a
    level uses the same message without a client id. ``num_bytes`` is what sending it costs.
    """

    adapter: Adapter
    base: dict[str, torch.Tensor] | None
    num_bytes: int


class LocalHook(Protocol):
    """A rule's part in a client's local training (HetLoRA's regulariser and self-pruning)."""

    regulariser: Callable[..., torch.Tensor] | None
    """Added to the training loss (``train_local``'s ``regulariser``), or None."""

    def rank_after(self) -> int:
        """The rank the client returns and keeps after training."""
        ...


class AggregationRule:
    """Base class: ``aggregate`` builds the new global adapter, ``downlink`` what a client gets.

    The default downlink is the rank-r prefix (A[:r], B[:, :r]) of the global adapter, with no
    ``fold``. A rule with server state beyond the global adapter overrides ``init_state`` and
    ``update`` (and ``merged`` / ``extra_bytes`` if clients need part of it); ``sum_form``
    says whether it can aggregate from summed messages (secure aggregation, DP).
    """

    name: ClassVar[str] = ""
    config_section: ClassVar[str | None] = None
    """The config section holding the rule's own options, handed over as ``options.section``."""
    sum_form: ClassVar[bool] = False
    """The rule's aggregate is row-wise data-weighted averaging of delta-form messages
    (docs/design.md §4.9), so it runs under secure aggregation and DP."""

    def __init__(self, options: RuleOptions | None = None) -> None:
        self.options = options or RuleOptions()

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        raise NotImplementedError

    def init_state(self, global_adapter: Adapter) -> RuleState:
        """The rule's round-0 state (default: none)."""
        return {}

    def update(
        self, global_adapter: Adapter, state: RuleState, updates: Sequence[ClientUpdate]
    ) -> tuple[Adapter, RuleState, AggregationResult]:
        """One aggregation: the new global adapter and rule state (default: ``aggregate``,
        state unchanged)."""
        result = self.aggregate(global_adapter, updates)
        return result.adapter, state, result

    def local_hook(self, nested: NestedLoRA, rank: int) -> LocalHook | None:
        """The rule's part in the local training of a client of ``rank`` whose received adapter
        is loaded in ``nested`` (default: none)."""
        return None

    def merged(self, state: RuleState) -> dict[str, torch.Tensor] | None:
        """Weight deltas every model built from the global state adds to W0 (default: none)."""
        return None

    def extra_bytes(self, state: RuleState) -> int:
        """Bytes every client downloads besides its adapter and fold (default: 0)."""
        return 0

    def message(
        self,
        global_adapter: Adapter,
        state: RuleState,
        rank: int,
        *,
        client_id: int | None = None,
        round_: int | None = None,
    ) -> Downlink:
        """Client ``client_id``'s downlink at ``rank``: ``downlink``, with ``merged`` plus
        ``fold`` as its base delta, costing the adapter, ``extra_bytes`` and the fold's bytes."""
        adapter = self.downlink(global_adapter, rank, client_id=client_id, round_=round_)
        fold = self.fold(global_adapter, rank, client_id=client_id, round_=round_)
        num_bytes = adapter_num_bytes(adapter) + self.extra_bytes(state)
        if fold is None:
            return Downlink(adapter, self.merged(state), num_bytes)
        return Downlink(adapter, add_deltas(self.merged(state), fold.delta), num_bytes + fold.num_bytes)

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


class MergingRule(AggregationRule):
    """A rule that merges each round's aggregate into the base weights (FLoRA, FLoRIST).

    State: ``merged/{module}`` = sum over rounds of the merged deltas (W = W0 + that sum) and
    ``broadcast_bytes``, what every client downloads next round to apply the merge.
    """

    def update(
        self, global_adapter: Adapter, state: RuleState, updates: Sequence[ClientUpdate]
    ) -> tuple[Adapter, RuleState, AggregationResult]:
        result = self.aggregate(global_adapter, updates)
        new = dict(state)
        for name, delta in (result.base_delta or {}).items():
            key = f"merged/{name}"
            new[key] = state[key] + delta.float() if key in state else delta.float().clone()
        new["broadcast_bytes"] = torch.tensor(result.broadcast_bytes, dtype=torch.int64)
        return result.adapter, new, result

    def local_hook(self, nested: NestedLoRA, rank: int) -> LocalHook | None:
        """The rule's part in the local training of a client of ``rank`` whose received adapter
        is loaded in ``nested`` (default: none)."""
        return None

    def merged(self, state: RuleState) -> dict[str, torch.Tensor] | None:
        out = {k.removeprefix("merged/"): v for k, v in state.items() if k.startswith("merged/")}
        return out or None

    def extra_bytes(self, state: RuleState) -> int:
        return int(state["broadcast_bytes"]) if "broadcast_bytes" in state else 0


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
