"""Framework-free federated steps shared by the in-process simulator and the Flower app.

``client_update`` is one client's round (receive prefix, train, return prefix) and
``server_update`` one aggregation; the simulator and ``prelort.flower`` both call them, so
the paths cannot drift (docs/design.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import Adapter, init_adapter
from prelort.aggregation.base import AggregationResult, AggregationRule, ClientUpdate, RuleState
from prelort.aggregation.sumform import RowSums, apply_sums
from prelort.federation.plan import RunPlan, generator_for
from prelort.federation.privacy import clip_update
from prelort.federation.workload import Workload
from prelort.training.local import Distiller, TrainStats, train_local


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds."""

    round: int
    adapter: Adapter
    client_ranks: tuple[int, ...]
    """Current rank per client (capacities, lowered by HetLoRA's self-pruning)."""
    rule_state: RuleState = field(default_factory=dict)
    """The aggregation rule's own state (``AggregationRule.init_state`` / ``update``), carried
    unopened (docs/design.md §6)."""


@dataclass(frozen=True)
class ClientResult:
    update: ClientUpdate
    stats: TrainStats


def initial_state(plan: RunPlan, shapes: dict[str, tuple[int, int]], rule: AggregationRule) -> ServerState:
    """Round-0 state: a fresh rank-R adapter (A random, B = 0) from the run's seed, and the
    rule's own initial state."""
    adapter = init_adapter(shapes, plan.max_rank, generator_for(plan.seed, "init"))
    return ServerState(round=0, adapter=adapter, client_ranks=plan.ranks, rule_state=rule.init_state(adapter))


def client_update(
    nested: NestedLoRA,
    received: Adapter,
    *,
    client_id: int,
    round_: int,
    plan: RunPlan,
    workload: Workload,
    on_step: Callable[[], None] | None = None,
) -> ClientResult:
    """One client's round: load the received prefix, train locally, return the prefix.

    The client's rank is the rank of ``received``; HetLoRA clients may return a lower rank
    after self-pruning. Randomness (batches, sampled levels) comes from a generator seeded by
    (seed, round, client), so any process computes the same update.
    """
    rank = next(iter(received.values())).rank
    nested.set_adapter(received)
    nested.set_rank(rank)
    gen = generator_for(plan.seed, "client", round_, client_id)
    batches = workload.batches(client_id, gen)
    train_cfg = plan.local_config(rank, round_)
    hook = plan.make_rule().local_hook(nested, rank)  # HetLoRA: regulariser + self-pruning
    distiller = workload if isinstance(workload, Distiller) else None  # train.distill: FjORD-style
    if train_cfg.distill > 0 and distiller is None:
        raise ValueError(
            f"train.distill needs a workload with distill_loss; {type(workload).__name__} has none"
        )
    regulariser = hook.regulariser if hook is not None else None
    stats = train_local(
        nested, rank, plan.levels, batches, workload.loss, train_cfg, gen, regulariser, on_step, distiller
    )
    new_rank = hook.rank_after() if hook is not None else rank
    adapter = nested.get_adapter(new_rank)
    if plan.privacy is not None and plan.privacy.clip is not None:  # client-level DP: ||change|| <= C
        adapter = clip_update(received, adapter, plan.privacy.clip)
    update = ClientUpdate(
        adapter=adapter,
        rank=new_rank,
        num_examples=workload.num_examples(client_id),
        client_id=client_id,
    )
    return ClientResult(update, stats)


def server_update(
    state: ServerState, rule: AggregationRule, updates: Sequence[ClientUpdate]
) -> tuple[ServerState, AggregationResult]:
    """Aggregate one round's updates into the next server state."""
    t = state.round + 1
    gen = rule.options.generator
    if rule.options.seed is not None:  # per-round randomness (FLoRA's fresh factors), resumable
        gen = generator_for(rule.options.seed, "rule", t)
    # the round lets a rule recompute per-client choices from (seed, round, client) (Fed-PLoRA)
    rule = type(rule)(replace(rule.options, generator=gen, round=t))
    adapter, rule_state, result = rule.update(state.adapter, state.rule_state, updates)
    ranks = list(state.client_ranks)
    for u in updates:
        if u.client_id is not None:
            ranks[u.client_id] = u.rank
    new = replace(
        state, round=state.round + 1, adapter=adapter, client_ranks=tuple(ranks), rule_state=rule_state
    )
    return new, result


def server_update_from_sums(
    state: ServerState,
    sums: RowSums,
    *,
    rule: AggregationRule,
    denominator: torch.Tensor | None = None,
) -> ServerState:
    """One aggregation from summed delta-form messages (docs/design.md §4.9): row i becomes
    ``g[i] + S[i] / W[i]`` where W[i] > 0 (``denominator``: the public owner counts under
    differential privacy), the old row elsewhere, then the rule's ``finish_sums``
    post-processing (the importance order). The server never sees an individual update."""
    adapter = apply_sums(state.adapter, sums, delta=True, denominator=denominator)
    adapter = rule.finish_sums(adapter)
    return replace(state, round=state.round + 1, adapter=adapter)
