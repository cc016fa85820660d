"""One round driver for every runtime (docs/design.md §6).

A round: sample clients (``RunPlan.sample``), build each one's downlink, run the client
updates through a ``Transport`` (``prelort.federation.transport``), drop clients that failed,
were late or sent an invalid update (``screen``), skip the round if fewer than
``run.min_clients`` updates remain, else ``server_update``; record bytes, passes and examples;
evaluate every ``eval_every`` rounds; hand the state and the record to the observers
(checkpointing, TensorBoard). The in-process simulator and the Flower ServerApp (deployment
or simulation engine) differ only in their ``Transport``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import add_deltas
from prelort.aggregation.base import AggregationRule
from prelort.federation.core import ServerState, initial_state, server_update, server_update_from_sums
from prelort.federation.plan import RunPlan
from prelort.federation.privacy import noise_generator, owner_counts, privatize, sent_rows
from prelort.federation.run_folder import results_dict
from prelort.federation.transport import (
    ClientJob,
    RoundSums,
    Screened,
    SumSpec,
    SumTransport,
    Transport,
    Watched,
    WireCounter,
    screen,
    sum_outcomes,
)
from prelort.federation.workload import Workload
from prelort.reporting.progress import RoundProgress

log = logging.getLogger("prelort")

RoundCallback = Callable[[dict[str, Any]], None]
StateCallback = Callable[[ServerState, list[dict[str, Any]]], None]


class RoundObserver(Protocol):
    """Hears of a driver's rounds: ``on_state`` with the state after a round and the records so
    far, then ``on_round`` with the round's record (round 0's too, from ``RoundDriver.start``)."""

    def on_round(self, record: dict[str, Any]) -> None: ...
    def on_state(self, state: ServerState, rounds: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True)
class Callbacks:
    """Plain functions as a ``RoundObserver`` (``run_simulation``'s ``on_round`` / ``on_state``)."""

    round_fn: RoundCallback | None = None
    state_fn: StateCallback | None = None

    def on_round(self, record: dict[str, Any]) -> None:
        if self.round_fn:
            self.round_fn(record)

    def on_state(self, state: ServerState, rounds: list[dict[str, Any]]) -> None:
        if self.state_fn:
            self.state_fn(state, rounds)


_BASE_METRICS: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()
"""The base model's metrics per workload, shared by every driver of it (``prelort compare``)."""


def evaluate_per_rank(
    nested: NestedLoRA,
    rule: AggregationRule,
    state: ServerState,
    levels: Sequence[int],
    workload: Workload,
    on_level: Callable[[int], None] | None = None,
    merged: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the global model as a client of each level holds it: ``rule.downlink`` at
    the level, with its base delta (``rule.message``: FLoRA's merge, Fed-PLoRA's fold) on W0.

    ``merged``: weight deltas already merged into the base outside ``state`` (``prelort eval``
    of a run's ``base_delta.safetensors``), added to every level's base delta.

    While B = 0 everywhere (round 0, every method) the model is the base model at every
    level, so it is evaluated once per workload and the result reused.
    """
    out: dict[str, dict[str, float]] = {}
    untrained = all(not bool(p.B.any()) for p in state.adapter.values())
    if untrained and merged is None and rule.merged(state.rule_state) is None:
        base = _BASE_METRICS.get(workload)
        if base is None:
            nested.set_adapter(state.adapter)
            nested.set_base(None)
            with torch.no_grad():
                base = _BASE_METRICS[workload] = workload.evaluate(nested.model)
        return {str(lv): dict(base) for lv in levels}
    for lv in levels:
        if on_level is not None:
            on_level(lv)
        msg = rule.message(state.adapter, state.rule_state, lv)
        nested.set_adapter(msg.adapter)
        nested.set_rank(lv)
        nested.set_base(add_deltas(merged, msg.base))
        with torch.no_grad():
            out[str(lv)] = workload.evaluate(nested.model)
    return out


def round_record(
    t: int,
    jobs: Sequence[ClientJob],
    t_train: float,
    tally: Screened | RoundSums,
    aggregated: Sequence[int | None],
    skipped: bool,
    train_loss: float = float("nan"),
    rows: int | None = None,
) -> dict[str, Any]:
    """Round ``t``'s ``results.json`` record before its evaluation, plain or sum round (which adds
    ``rows`` and releases no ``train_loss``); the keys keep this order in ``results.json``."""
    record: dict[str, Any] = {"round": t, "seconds": 0.0, "train_seconds": t_train}
    record.update(bytes_up=tally.bytes_up, bytes_down=sum(job.num_bytes for job in jobs))
    record.update(passes=tally.passes, examples=tally.examples, clients=[job.client_id for job in jobs])
    record.update(aggregated=list(aggregated), dropped=tally.dropped, skipped=skipped, train_loss=train_loss)
    if rows is not None:
        record["rows"] = rows
    if tally.wire_bytes_up is not None:
        record["wire_bytes_up"] = tally.wire_bytes_up
    return record


def _log_drops(t: int, dropped: list[dict[str, Any]]) -> None:
    for d in dropped:
        log.warning("round %d: client %d dropped, %s", t, d["client"], d["reason"])


class RoundDriver:
    """Runs the rounds of one plan over one transport; ``nested`` is the server's model copy
    (evaluation, and FLoRA's merged base); ``observers`` (and ``on_state`` / ``on_round``, as
    ``Callbacks``) hear of every round."""

    def __init__(
        self,
        plan: RunPlan,
        transport: Transport,
        nested: NestedLoRA,
        workload: Workload,
        *,
        on_state: StateCallback | None = None,
        on_round: RoundCallback | None = None,
        observers: Sequence[RoundObserver] = (),
        progress: bool = False,
    ) -> None:
        self.plan, self.rule, self.transport = plan, plan.make_rule(), transport
        self.nested, self.workload, self.progress = nested, workload, progress
        self.observers = [*observers, *([Callbacks(on_round, on_state)] if on_round or on_state else [])]
        self.view: RoundProgress | None = None

    def start(self) -> tuple[ServerState, list[dict[str, Any]]]:
        """Round-0 state and its record (the base model evaluated at every level)."""
        state = initial_state(self.plan, self.nested.shapes(), self.rule)
        record: dict[str, Any] = {"round": 0, "seconds": 0.0, "bytes_up": 0, "bytes_down": 0}
        record.update(passes=0, examples=0, per_rank=self.evaluate(state))
        for o in self.observers:
            o.on_round(record)
        return state, [record]

    def evaluate(self, state: ServerState) -> dict[str, dict[str, float]]:
        on_level = self.view.evaluating if self.view is not None else None
        return evaluate_per_rank(
            self.nested, self.rule, state, self.plan.eval_levels, self.workload, on_level
        )

    def job(self, state: ServerState, k: int, t: int) -> ClientJob:
        """Client ``k``'s job in round ``t``: the rule's message to it."""
        msg = self.rule.message(state.adapter, state.rule_state, state.client_ranks[k], client_id=k, round_=t)
        return ClientJob(k, msg.adapter, msg.base, msg.num_bytes)

    def run_round(self, t: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One federated round; returns the new state and the round's ``results.json`` record:
        ``round_record`` plus the wire bytes down, the evaluation (every ``eval_every`` rounds)
        and the time."""
        t0 = time.perf_counter()
        run = self.plan.cfg.run
        jobs = [self.job(state, k, t) for k in self.plan.sample(t)]
        if self.view is not None:
            self.view.round_started(t, [(job.client_id, state.client_ranks[job.client_id]) for job in jobs])
        round_ = self.run_plain_round if self.plan.privacy is None else self.run_sum_round
        state, record = round_(t, state, jobs, t0)
        if isinstance(self.transport, WireCounter):
            record["wire_bytes_down"] = self.transport.wire_bytes_down
        if t % run.eval_every == 0 or t == run.rounds:
            t_eval = time.perf_counter()
            record["per_rank"] = self.evaluate(state)
            record["eval_seconds"] = time.perf_counter() - t_eval
        record["seconds"] = time.perf_counter() - t0
        return state, record

    def run_plain_round(
        self, t: int, state: ServerState, jobs: Sequence[ClientJob], t0: float
    ) -> tuple[ServerState, dict[str, Any]]:
        """The clients' updates, screened, aggregated by ``server_update``."""
        min_clients = self.plan.cfg.run.min_clients
        outcomes = {o.client_id: o for o in self.transport.execute(t, state, jobs)}
        t_train = time.perf_counter() - t0
        s = screen(
            self.plan, outcomes, [job.client_id for job in jobs], {j.client_id: j.received for j in jobs}
        )
        updates, losses = [res.update for _, res in s.kept], [res.stats.loss for _, res in s.kept]
        loss = sum(losses) / len(losses) if losses else float("nan")
        _log_drops(t, s.dropped)
        skipped = len(updates) < min_clients
        record = round_record(t, jobs, t_train, s, [u.client_id for u in updates], skipped, loss)
        if skipped:
            msg = "round %d: only %d valid update(s), fewer than run.min_clients = %d; global adapter kept"
            log.warning(msg, t, len(updates), min_clients)
            return replace(state, round=t), record
        return server_update(state, self.rule, updates)[0], record

    def run_sum_round(
        self, t: int, state: ServerState, jobs: Sequence[ClientJob], t0: float
    ) -> tuple[ServerState, dict[str, Any]]:
        """A ``[privacy]`` round (docs/design.md §4.9): the clients' delta-form messages are
        summed (by SecAgg+ where the transport is a ``SumTransport``), the server adds the
        Gaussian noise to the sum (DP) and divides row by row. Per-client losses are not
        released (``train_loss`` NaN); per-client validation is the summing party's."""
        privacy, plan, min_clients = self.plan.privacy, self.plan, self.plan.cfg.run.min_clients
        assert privacy is not None
        sampled = [job.client_id for job in jobs]
        rows = sent_rows([state.client_ranks[k] for k in sampled], plan.levels, privacy.min_owners())
        spec = SumSpec(plan.max_rank, rows)
        if isinstance(self.transport, SumTransport):
            rs = self.transport.execute_sums(t, state, jobs, spec)
        else:
            outcomes = {o.client_id: o for o in self.transport.execute(t, state, jobs)}
            rs = sum_outcomes(plan, outcomes, sampled, {job.client_id: job.received for job in jobs}, spec)
        t_train = time.perf_counter() - t0
        _log_drops(t, rs.dropped)
        skipped = rs.sums is None or len(rs.aggregated) < min_clients or rows == 0
        record = round_record(t, jobs, t_train, rs, rs.aggregated, skipped, rows=rows)
        if skipped or rs.sums is None:
            msg = "round %d: %d client(s) in the sum (run.min_clients = %d), %d rank rows with enough "
            log.warning(msg + "owners; global adapter kept", t, len(rs.aggregated), min_clients, rows)
            return replace(state, round=t), record
        counts = owner_counts([state.client_ranks[k] for k in rs.aggregated], plan.max_rank, rows)
        sums = rs.sums
        if privacy.dp:  # central DP: noise on the (unmasked) sum, divided by the public counts
            sums = privatize(sums, counts, privacy.noise_std, noise_generator(privacy, plan.seed, t))
            denominator = counts
        else:  # data weights: the summed weights, on the rows someone owned
            denominator = torch.where(counts > 0, sums.weight, torch.zeros_like(sums.weight))
        return server_update_from_sums(state, sums, denominator=denominator, rule=self.rule), record

    def run(
        self, state: ServerState, rounds: list[dict[str, Any]], *, observers: Sequence[RoundObserver] = ()
    ) -> tuple[ServerState, list[dict[str, Any]]]:
        """Rounds ``state.round + 1 .. run.rounds``; ``rounds`` holds the records so far.
        ``observers`` hear of these rounds, before the driver's own (``run_in_folder``'s)."""
        rounds, watchers = list(rounds), [*observers, *self.observers]
        if self.progress:
            self.view = RoundProgress(self.plan, done=state.round)
        watched = self.transport if isinstance(self.transport, Watched) else None
        if watched is not None:
            watched.view = self.view
        try:
            for t in range(state.round + 1, self.plan.cfg.run.rounds + 1):
                state, record = self.run_round(t, state)
                rounds.append(record)
                for o in watchers:
                    o.on_state(state, rounds)
                for o in watchers:
                    o.on_round(record)
                if self.view is not None:
                    self.view.round_done(record)
        finally:
            if self.view is not None:
                self.view.stop()
            self.view = None
            if watched is not None:
                watched.view = None
        return state, rounds

    def results(self, state: ServerState, rounds: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        """The ``results.json`` dict (docs/design.md §7)."""
        return results_dict(self.plan, state, rounds, seconds)
