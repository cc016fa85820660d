"""Framework-free federated steps shared by the in-process simulator and the Flower app.

``client_update`` is one client's round (receive prefix, train, return prefix) and
``server_update`` one aggregation; the simulator and ``prelort.flower`` both call them, so
the paths cannot drift (docs/design.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import Adapter, init_adapter
from prelort.aggregation.base import AggregationResult, AggregationRule, ClientUpdate
from prelort.aggregation.sumform import RowSums, apply_sums
from prelort.federation.plan import RunPlan, generator_for
from prelort.federation.privacy import clip_update
from prelort.federation.workload import Workload
from prelort.training.hetlora import make_regulariser, pruned_rank, tail_norm
from prelort.training.local import Distiller, TrainStats, train_local


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds."""

    round: int
    adapter: Adapter
    client_ranks: tuple[int, ...]
    """Current rank per client (capacities, lowered by HetLoRA's self-pruning)."""
    base_delta: dict[str, torch.Tensor] | None = None
    """Sum of weight deltas merged into the base so far (FLoRA)."""
    broadcast_bytes: int = 0
    """Extra bytes each client downloads next round (FLoRA's stack)."""


@dataclass(frozen=True)
class ClientResult:
    update: ClientUpdate
    stats: TrainStats


def initial_state(plan: RunPlan, shapes: dict[str, tuple[int, int]]) -> ServerState:
    """Round-0 state: a fresh rank-R adapter (A random, B = 0) from the run's seed."""
    adapter = init_adapter(shapes, plan.max_rank, generator_for(plan.seed, "init"))
    return ServerState(round=0, adapter=adapter, client_ranks=plan.ranks)


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
    method, h = plan.method, plan.cfg.hetlora
    rank = next(iter(received.values())).rank
    nested.set_adapter(received)
    nested.set_rank(rank)
    gen = generator_for(plan.seed, "client", round_, client_id)
    batches = workload.batches(client_id, gen)
    train_cfg = plan.local_config(rank, round_)
    floor = h.min_rank if h.min_rank is not None else min(plan.levels)
    regulariser = make_regulariser(h.lam, h.gamma, min_rank=floor) if method.self_prune else None
    before = float(tail_norm(nested, rank, h.gamma, min_rank=floor).detach()) if method.self_prune else 0.0
    distiller = workload if isinstance(workload, Distiller) else None  # train.distill: FjORD-style
    if train_cfg.distill > 0 and distiller is None:
        raise ValueError(
            f"train.distill needs a workload with distill_loss; {type(workload).__name__} has none"
        )
    stats = train_local(
        nested, rank, plan.levels, batches, workload.loss, train_cfg, gen, regulariser, on_step, distiller
    )
    new_rank = rank
    if method.self_prune:
        after = float(tail_norm(nested, rank, h.gamma, min_rank=floor).detach())
        new_rank = pruned_rank(rank, before, after, h.gamma, floor)
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
    result = rule.aggregate(state.adapter, updates)
    base = state.base_delta
    if result.base_delta is not None:
        if base is None:
            base = {k: v.float().clone() for k, v in result.base_delta.items()}
        else:
            base = {k: base[k] + result.base_delta[k].float() for k in base}
    ranks = list(state.client_ranks)
    for u in updates:
        if u.client_id is not None:
            ranks[u.client_id] = u.rank
    new = replace(
        state,
        round=state.round + 1,
        adapter=result.adapter,
        client_ranks=tuple(ranks),
        base_delta=base,
        broadcast_bytes=result.broadcast_bytes,
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
