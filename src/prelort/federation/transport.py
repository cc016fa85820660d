"""What the round driver and a runtime exchange (docs/design.md §6): the jobs it sends, the
outcomes it gets back, the ``Transport`` protocols a runtime implements, and what the driver
accepts of the outcomes (``screen``; ``sum_outcomes`` for a sum round).

A ``Transport`` runs one round's client jobs. Optional capabilities are explicit protocols the
driver checks with ``isinstance``: ``SumTransport`` (secure aggregation: the driver gets only
the sum of the clients' messages), ``WireCounter`` (bytes sent on the wire) and ``Watched``
(a progress display to report client steps to).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from prelort.adapters.state import Adapter, adapter_num_bytes
from prelort.aggregation.sumform import FLOAT_BYTES, RowSums, client_sums
from prelort.federation.core import ClientResult, ServerState
from prelort.federation.validation import rejection_reason

if TYPE_CHECKING:
    from prelort.federation.plan import RunPlan
    from prelort.reporting.progress import RoundProgress


@dataclass(frozen=True)
class ClientJob:
    """What one sampled client is sent: its id and the rule's ``Downlink`` (its adapter, the
    weight delta it adds to its frozen base weights, and what sending both costs)."""

    client_id: int
    received: Adapter
    base: dict[str, torch.Tensor] | None = None
    """Weight delta on W0 while this client trains (FLoRA's merged updates, Fed-PLoRA's fold)."""
    num_bytes: int = 0
    """What sending the job costs, counted in ``bytes_down``."""


@dataclass(frozen=True)
class ClientOutcome:
    """What came back from one client: a result, or the reason it failed."""

    client_id: int
    result: ClientResult | None = None
    error: str | None = None
    """Why no usable reply arrived ("raised ...", "timed out ...", "rejected: malformed ...")."""
    seconds: float = 0.0
    wire_bytes_up: int | None = None
    """Bytes on the wire when the transport knows them (Flower)."""


@dataclass(frozen=True)
class SumSpec:
    """What a sum round (a ``[privacy]`` run) asks of every client: padded delta-form messages
    at rank ``max_rank`` carrying only the first ``rows`` rank rows (the segments with at least
    ``privacy.min_segment_owners`` sampled owners under secure aggregation)."""

    max_rank: int
    rows: int


@dataclass
class RoundSums:
    """What a sum round yields: the summed messages and who is in them, never an update."""

    sums: RowSums | None
    """Sum of the messages of ``aggregated`` (None: nothing summed, e.g. SecAgg+ halted)."""
    aggregated: list[int]
    dropped: list[dict[str, Any]]
    bytes_up: int = 0
    passes: int = 0
    examples: int = 0
    wire_bytes_up: int | None = None


class Transport(Protocol):
    """How a runtime executes one round's client updates."""

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        """Run every job; one outcome per job (any order)."""
        ...


@runtime_checkable
class SumTransport(Protocol):
    """A transport that aggregates securely (Flower's SecAgg+): in a sum round the driver gets
    only the sum of the clients' messages (docs/design.md §4.9); other transports' outcomes
    are summed by ``sum_outcomes``."""

    def execute_sums(
        self, round_: int, state: ServerState, jobs: Sequence[ClientJob], spec: SumSpec
    ) -> RoundSums: ...


@runtime_checkable
class WireCounter(Protocol):
    """A transport that counts the bytes it sent on the wire in the last round (Flower)."""

    wire_bytes_down: int


@runtime_checkable
class Watched(Protocol):
    """A transport that reports client starts and steps to the driver's progress display
    (in-process); the driver sets ``view`` while a display is shown."""

    view: RoundProgress | None


@dataclass
class Screened:
    """A round's outcomes after the drops: the results kept (sampled order), the dropped clients
    with their reasons, and what the replies cost."""

    kept: list[tuple[int, ClientResult]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    passes: int = 0
    examples: int = 0
    wire_bytes_up: int | None = None


def screen(
    plan: RunPlan,
    outcomes: Mapping[int, ClientOutcome],
    sampled: Sequence[int],
    sent: Mapping[int, Adapter],
    *,
    pad_to: int | None = None,
) -> Screened:
    """Walk the sampled clients in order; drop a missing reply, an error, a late one
    (``run.client_timeout``) and a rejected one (``rejection_reason``). ``bytes_up`` counts
    every result: its update's size or, with ``pad_to`` (a sum round), the padded message's."""
    run = plan.cfg.run
    s = Screened()
    for k in sampled:
        out = outcomes.get(k)
        if out is None:
            s.dropped.append({"client": k, "reason": "timed out (no reply before the round's deadline)"})
            continue
        if out.wire_bytes_up is not None:
            s.wire_bytes_up = (s.wire_bytes_up or 0) + out.wire_bytes_up
        if out.result is None:
            s.dropped.append({"client": k, "reason": out.error or "no result"})
            continue
        res = out.result
        s.bytes_up += (
            adapter_num_bytes(res.update.adapter) if pad_to is None else _padded_bytes(sent[k], pad_to)
        )
        s.passes += res.stats.passes
        s.examples += res.stats.examples
        if run.client_timeout and out.seconds > run.client_timeout:
            s.dropped.append(
                {"client": k, "reason": f"timed out ({out.seconds:.1f}s > {run.client_timeout}s)"}
            )
            continue
        reason = rejection_reason(
            res.update, sent=sent[k], capacity=plan.ranks[k], max_norm=run.max_update_norm or None
        )
        if reason is not None:
            s.dropped.append({"client": k, "reason": f"rejected: {reason}"})
            continue
        s.kept.append((k, res))
    return s


def sum_outcomes(
    plan: RunPlan,
    outcomes: dict[int, ClientOutcome],
    sampled: Sequence[int],
    sent: dict[int, Adapter],
    spec: SumSpec,
) -> RoundSums:
    """The trusted sum of a round's outcomes (in-process runtime, or a transport without
    secure aggregation): each client's delta-form message (``client_sums``) added up after
    the same drops as a plain round (``screen``)."""
    assert plan.privacy is not None
    s = screen(plan, outcomes, sampled, sent, pad_to=spec.max_rank)
    total: RowSums | None = None
    for k, res in s.kept:
        weight = plan.privacy.weight(res.update.num_examples)
        msg = client_sums(res.update, spec.max_rank, weight, reference=sent[k], rows=spec.rows)
        total = msg if total is None else total + msg
    # no ``wire_bytes_up``: a sum round's record reports wire bytes only from a ``SumTransport``
    return RoundSums(total, [k for k, _ in s.kept], s.dropped, s.bytes_up, s.passes, s.examples)


def _padded_bytes(received: Adapter, max_rank: int) -> int:
    """Bytes of a padded message for modules shaped like ``received``, at rank ``max_rank``."""
    entries = sum(max_rank * (p.A.shape[1] + p.B.shape[0]) for p in received.values()) + max_rank
    return FLOAT_BYTES * entries
