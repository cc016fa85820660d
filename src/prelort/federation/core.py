"""Framework-free federated steps shared by the in-process simulator and the Flower app.

``client_update`` is one client's round (receive prefix, train, return prefix) and
``server_update`` one aggregation; the simulator and ``prelort.flower`` both call them, so
the two paths cannot drift (STYLE.md, habit 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import Adapter, Scaling, init_adapter
from prelort.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    RuleOptions,
    get_rule,
)
from prelort.config import Config
from prelort.federation.methods import MethodSpec, get_method
from prelort.federation.workload import Workload
from prelort.training.hetlora import make_regulariser, pruned_rank, tail_norm
from prelort.training.local import LocalTrainConfig, TrainStats, train_local


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (same in every process and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator_for(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def assign_ranks(cfg: Config) -> list[int]:
    """Rank capacity r_k per client: explicit list, or drawn from the levels.

    ``cycle`` assigns levels round-robin (equal counts), ``uniform`` draws each client's level
    uniformly, ``heavy-tail`` draws level j with probability proportional to 2^-j (most
    clients small).
    """
    cl = cfg.clients
    if cl.ranks is not None:
        return list(cl.ranks)
    levels = cl.levels
    if cl.rank_distribution == "cycle":
        return [levels[k % len(levels)] for k in range(cl.num_clients)]
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "ranks"))
    if cl.rank_distribution == "uniform":
        probs = np.full(len(levels), 1.0 / len(levels))
    else:
        w = 0.5 ** np.arange(len(levels))
        probs = w / w.sum()
    return [int(levels[i]) for i in rng.choice(len(levels), size=cl.num_clients, p=probs)]


def effective_ranks(method: MethodSpec, capacities: Sequence[int], levels: Sequence[int]) -> list[int]:
    """The rank each client trains at: its capacity, or FedIT's common rank."""
    if method.homogeneous == "min":
        return [min(levels)] * len(capacities)
    if method.homogeneous == "max":
        return [max(levels)] * len(capacities)
    return list(capacities)


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The sorted client ids of a round, from a generator seeded by (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, "sample", round_))
    return sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))


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


def make_rule(cfg: Config, method: MethodSpec) -> AggregationRule:
    scaling = make_scaling(cfg)
    return get_rule(method.rule, RuleOptions(scaling=scaling, seed=cfg.run.seed))


def make_scaling(cfg: Config) -> Scaling:
    return Scaling(cfg.lora.scaling, cfg.lora.alpha, cfg.max_rank)


def local_config(cfg: Config, method: MethodSpec) -> LocalTrainConfig:
    t = cfg.train
    return LocalTrainConfig(
        steps=t.steps,
        lr=t.lr,
        weight_decay=t.weight_decay,
        mode=t.nested_mode if method.nested else "plain",
        own_weight=None if t.own_weight == "equal" else float(t.own_weight),
        max_grad_norm=t.max_grad_norm,
    )


def initial_state(cfg: Config, shapes: dict[str, tuple[int, int]]) -> ServerState:
    """Round-0 state: a fresh rank-R adapter (A random, B = 0) from the run's seed."""
    method = get_method(cfg.run.method)
    ranks = effective_ranks(method, assign_ranks(cfg), cfg.clients.levels)
    adapter = init_adapter(shapes, cfg.max_rank, generator_for(cfg.run.seed, "init"))
    return ServerState(round=0, adapter=adapter, client_ranks=tuple(ranks))


def client_update(
    nested: NestedLoRA,
    received: Adapter,
    *,
    client_id: int,
    round_: int,
    cfg: Config,
    workload: Workload,
) -> ClientResult:
    """One client's round: load the received prefix, train locally, return the prefix.

    The client's rank is the rank of ``received``; HetLoRA clients may return a lower rank
    after self-pruning. Randomness (batches, sampled levels) comes from a generator seeded by
    (seed, round, client), so any process computes the same update.
    """
    method = get_method(cfg.run.method)
    rank = next(iter(received.values())).rank
    nested.set_adapter(received)
    nested.set_rank(rank)
    gen = generator_for(cfg.run.seed, "client", round_, client_id)
    batches = workload.batches(client_id, gen)
    train_cfg = local_config(cfg, method)
    h = cfg.hetlora
    regulariser = make_regulariser(h.lam, h.gamma) if method.self_prune else None
    before = float(tail_norm(nested, rank, h.gamma).detach()) if method.self_prune else 0.0
    stats = train_local(nested, rank, cfg.clients.levels, batches, workload.loss, train_cfg, gen, regulariser)
    new_rank = rank
    if method.self_prune:
        after = float(tail_norm(nested, rank, h.gamma).detach())
        new_rank = pruned_rank(rank, before, after, h.gamma, h.min_rank)
    update = ClientUpdate(
        adapter=nested.get_adapter(new_rank),
        rank=new_rank,
        num_examples=workload.num_examples(client_id),
        client_id=client_id,
    )
    return ClientResult(update, stats)


def server_update(
    state: ServerState, rule: AggregationRule, updates: Sequence[ClientUpdate]
) -> tuple[ServerState, AggregationResult]:
    """Aggregate one round's updates into the next server state."""
    if rule.options.seed is not None:  # per-round randomness (FLoRA's fresh factors), resumable
        gen = generator_for(rule.options.seed, "rule", state.round + 1)
        rule = type(rule)(replace(rule.options, generator=gen))
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
