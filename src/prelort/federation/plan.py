"""The run plan: every value a run needs, resolved once from the validated config.

``build_plan(cfg)`` fixes the method spec, the aggregation rule, each client's rank, the rank
levels trained and evaluated, each client's local-training settings under the compute budget
and the client sampling. The round driver, the in-process simulator and the Flower apps read
the plan; nothing re-derives these values from the config (docs/design.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from prelort.adapters.state import Scaling
from prelort.aggregation.base import RULES, AggregationRule, RuleOptions, get_rule
from prelort.config import Config
from prelort.federation.methods import MethodSpec, Order, get_method, resolve_order
from prelort.federation.privacy import PrivacyPlan, resolve_privacy
from prelort.seeding import derive_seed
from prelort.seeding import generator_for as generator_for  # re-exported (federation.core, fed_plora)
from prelort.training.local import Factors, LocalTrainConfig


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
    if method.homogeneous == "level":
        assert method.level is not None
        return [method.level] * len(capacities)
    return list(capacities)


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """Uniform sampling: the sorted ids of ``per_round`` of ``num_clients`` clients, seeded by
    (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, "sample", round_))
    return sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))


def sample_stratified(seed: int, round_: int, ranks: Sequence[int], per_round: int) -> list[int]:
    """Stratified sampling over rank levels (docs/design.md §5).

    With m = ``per_round`` clients and n distinct ranks among ``ranks``: if m >= n, one client
    drawn uniformly from each rank's clients, and the other m - n uniformly from the rest;
    if m < n, one client from each of the m highest ranks. Seeded by (seed, round), so a
    resumed run samples what an uninterrupted one would. Returns sorted client ids.
    """
    rng = np.random.default_rng(derive_seed(seed, "stratified", round_))
    strata: dict[int, list[int]] = {}
    for k, r in enumerate(ranks):
        strata.setdefault(r, []).append(k)
    chosen: list[int] = []
    for r in sorted(strata, reverse=True)[:per_round]:
        members = strata[r]
        chosen.append(members[int(rng.integers(len(members)))])
    rest = [k for k in range(len(ranks)) if k not in set(chosen)]
    extra = per_round - len(chosen)
    if extra > 0:
        chosen += [rest[int(i)] for i in rng.choice(len(rest), size=extra, replace=False)]
    return sorted(chosen)


@dataclass(frozen=True)
class RunPlan:
    """A run's resolved values (see the module docstring)."""

    cfg: Config
    method: MethodSpec
    scaling: Scaling
    capacities: tuple[int, ...]
    """Rank capacity per client (the population, whatever the method)."""
    ranks: tuple[int, ...]
    """Rank each client trains at (capacity, or FedIT's common rank)."""
    levels: tuple[int, ...]
    """The rank levels L of the population."""
    eval_levels: tuple[int, ...]
    """Levels at which the global adapter is evaluated."""
    privacy: PrivacyPlan | None = None
    """The resolved ``[privacy]`` section: DP and/or secure aggregation (sum rounds)."""

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.levels)

    @property
    def order(self) -> Order:
        """The rank-dimension order of a segment-wise rule: ``aggregation.order``, or the
        method's own when it is ``auto``."""
        return resolve_order(self.method, self.cfg.aggregation.order)

    def make_rule(self) -> AggregationRule:
        """A fresh instance of the method's aggregation rule."""
        section_name = RULES[self.method.rule].config_section if self.method.rule in RULES else None
        section = getattr(self.cfg, section_name) if section_name else None
        return get_rule(
            self.method.rule,
            RuleOptions(
                scaling=self.scaling,
                seed=self.seed,
                order=self.order,
                split=self.cfg.aggregation.split,
                section=section,
            ),
        )

    def sample(self, round_: int) -> list[int]:
        """The sorted client ids of round ``round_`` (``run.sampling``)."""
        m = self.cfg.run.clients_per_round
        if self.cfg.run.sampling == "stratified":
            return sample_stratified(self.seed, round_, self.ranks, m)
        return sample_clients(self.seed, round_, self.num_clients, m)

    def trained_levels(self, rank: int) -> list[int]:
        """L_k: the levels a client of rank ``rank`` trains (nested methods), else [rank]."""
        if not self.method.nested:
            return [rank]
        return sorted({lv for lv in self.levels if lv <= rank} | {rank})

    def local_steps(self, rank: int) -> int:
        """Optimiser steps of a client of ``rank`` (docs/design.md §3).

        A step accumulates ``train.grad_accum`` = k micro-batches, each making the passes
        counted below, so k multiplies every client's passes alike and the steps do not depend
        on it: ``train.steps`` counts optimiser steps, and under ``"passes"`` every client makes
        about ``steps * k`` micro-batch passes (``TrainStats.passes``).

        ``train.budget = "passes"``: a nested ``all`` client makes |L_k| passes per step, so it
        gets max(1, round(steps / |L_k|)) steps; a nested ``sandwich`` client with more than one
        level makes 2, so it gets max(1, round(steps / 2)); every other client ``steps`` (one
        pass each, ``matryoshka`` included).
        """
        t = self.cfg.train
        if self.method.pinned_nesting is not None:  # one pass per step (``sample``)
            return t.steps
        if t.budget == "passes" and self.method.nested and t.nested_mode == "all":
            return max(1, round(t.steps / len(self.trained_levels(rank))))
        sandwich = self.method.nested and t.nested_mode == "sandwich"
        if t.budget == "passes" and sandwich and len(self.trained_levels(rank)) > 1:
            return max(1, round(t.steps / 2))
        return t.steps

    def local_config(self, rank: int, round_: int) -> LocalTrainConfig:
        """Local-training settings of a client of ``rank`` in round ``round_``.

        With ``train.own_weight_final`` the own weight of round t (1..run.rounds) is
        ``w0 + (w1 - w0) (t - 1) / (rounds - 1)`` (w0 = ``own_weight``, w1 the final; rounds
        outside 1..rounds are clamped, and one round gets w0).
        """
        t = self.cfg.train
        own = t.own_weight
        pinned = self.method.pinned_nesting
        if pinned is not None:  # the method fixes its nesting: no schedule, no distillation
            return LocalTrainConfig(
                steps=t.steps,
                lr=t.lr,
                weight_decay=t.weight_decay,
                mode=pinned[0],
                own_weight=pinned[1],
                max_grad_norm=t.max_grad_norm,
                **self._scale_options(),
            )
        if t.own_weight_final is not None and own not in ("equal", "geometric"):
            rounds = self.cfg.run.rounds
            frac = min(max(round_ - 1, 0), rounds - 1) / (rounds - 1) if rounds > 1 else 0.0
            own = float(own) + (t.own_weight_final - float(own)) * frac
        factors: Factors = "both"
        if t.factors == "b-only":
            factors = "B"
        elif t.factors == "alternate":  # RoLoRA: B on odd rounds, A on even ones
            factors = "B" if round_ % 2 == 1 else "A"
        return LocalTrainConfig(
            steps=self.local_steps(rank),
            lr=t.lr,
            weight_decay=t.weight_decay,
            mode=t.nested_mode if self.method.nested else "plain",
            own_weight=None if own == "equal" else ("geometric" if own == "geometric" else float(own)),
            max_grad_norm=t.max_grad_norm,
            factors=factors,
            distill=t.distill if self.method.nested else 0.0,
            **self._scale_options(),
        )

    def _scale_options(self) -> dict[str, Any]:
        """``train.grad_accum``, ``lr_schedule``, ``warmup_steps``, ``autocast`` and
        ``gradient_checkpointing`` for ``LocalTrainConfig`` (the same for every client)."""
        t = self.cfg.train
        return {
            "grad_accum": t.grad_accum,
            "lr_schedule": t.lr_schedule,
            "warmup_steps": t.warmup_steps,
            "autocast": t.autocast,
            "gradient_checkpointing": t.gradient_checkpointing,
        }

    def with_ranks(self, capacities: Sequence[int]) -> RunPlan:
        """The plan with other capacities (Flower: the ranks the SuperNodes reported)."""
        caps = tuple(int(r) for r in capacities)
        ranks = tuple(effective_ranks(self.method, caps, self.levels))
        return replace(self, capacities=caps, ranks=ranks)


def build_plan(cfg: Config) -> RunPlan:
    """Resolve ``cfg`` into a ``RunPlan``; a ``Config`` built in code is validated here too
    (``ConfigError`` with one line), as every runtime starts from a plan."""
    cfg.validate()
    method = get_method(cfg.run.method)
    levels = tuple(cfg.clients.levels)
    caps = tuple(assign_ranks(cfg))
    return RunPlan(
        cfg=cfg,
        method=method,
        scaling=Scaling(cfg.lora.scaling, cfg.lora.alpha, max(levels)),
        capacities=caps,
        ranks=tuple(effective_ranks(method, caps, levels)),
        levels=levels,
        eval_levels=tuple(cfg.run.eval_levels or levels),
        privacy=resolve_privacy(cfg),
    )
