"""One round driver for every runtime (docs/design.md §6).

A round: sample clients (``RunPlan.sample``), build each one's downlink, run the client
updates through a ``Transport``, drop clients that failed, were late or sent an invalid
update, skip the round if fewer than ``run.min_clients`` updates remain, else
``server_update``; record bytes, passes and examples; evaluate every ``eval_every`` rounds;
hand the state to ``on_state`` (checkpointing). The in-process simulator and the Flower
ServerApp (deployment or simulation engine) differ only in their ``Transport``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import Adapter, adapter_num_bytes
from prelort.aggregation.base import AggregationRule, ClientUpdate
from prelort.aggregation.sumform import FLOAT_BYTES, RowSums, client_sums
from prelort.config import config_to_dict, dump_toml
from prelort.federation.core import (
    ClientResult,
    ServerState,
    initial_state,
    server_update,
    server_update_from_sums,
)
from prelort.federation.methods import ORDER_RULES
from prelort.federation.plan import RunPlan
from prelort.federation.privacy import noise_generator, owner_counts, privacy_report, privatize, sent_rows
from prelort.federation.validation import rejection_reason
from prelort.federation.workload import Workload

log = logging.getLogger("prelort")

RoundCallback = Callable[[dict[str, Any]], None]
StateCallback = Callable[[ServerState, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ClientJob:
    """What one sampled client is sent: its id, its downlink adapter and, for rules that fold
    part of the global model into the client's frozen weights (Fed-PLoRA), its ``fold``."""

    client_id: int
    received: Adapter
    fold: dict[str, torch.Tensor] | None = None
    """Weight delta added on top of the global base delta while this client trains."""
    fold_bytes: int = 0
    """What sending the fold costs (``Fold.num_bytes``), counted in ``bytes_down``."""


@contextmanager
def folded(
    nested: NestedLoRA, base_delta: dict[str, torch.Tensor] | None, fold: dict[str, torch.Tensor] | None
) -> Iterator[None]:
    """Within the block the base weights are W0 + ``base_delta`` + ``fold``; afterwards
    W0 + ``base_delta`` again (bit-identical: ``set_base_delta`` recomputes from W0)."""
    if not fold:
        yield
        return
    base = base_delta or {}
    nested.set_base_delta({k: base[k] + v if k in base else v for k, v in fold.items()})
    try:
        yield
    finally:
        nested.set_base_delta({k: base[k] if k in base else torch.zeros_like(v) for k, v in fold.items()})


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


class Transport(Protocol):
    """How a runtime executes one round's client updates.

    A transport that aggregates securely (Flower's SecAgg+) also has ``execute_sums(round_,
    state, jobs, spec) -> RoundSums``: the driver then gets only the sum of the clients'
    messages (docs/design.md §4.9); other transports' outcomes are summed by ``sum_outcomes``.
    """

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        """Run every job; one outcome per job (any order)."""
        ...


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


def sum_outcomes(
    plan: RunPlan,
    outcomes: dict[int, ClientOutcome],
    sampled: Sequence[int],
    sent: dict[int, Adapter],
    spec: SumSpec,
) -> RoundSums:
    """The trusted sum of a round's outcomes (in-process runtime, or a transport without
    secure aggregation): each client's delta-form message (``client_sums``) added up after
    the same drops as a plain round (errors, late replies, ``rejection_reason``)."""
    assert plan.privacy is not None
    run = plan.cfg.run
    total: RowSums | None = None
    aggregated: list[int] = []
    dropped: list[dict[str, Any]] = []
    bytes_up = passes = examples = 0
    for k in sampled:
        out = outcomes.get(k)
        if out is None:
            dropped.append({"client": k, "reason": "timed out (no reply before the round's deadline)"})
            continue
        if out.result is None:
            dropped.append({"client": k, "reason": out.error or "no result"})
            continue
        res = out.result
        bytes_up += _padded_bytes(sent[k], spec.max_rank)
        passes += res.stats.passes
        examples += res.stats.examples
        if run.client_timeout and out.seconds > run.client_timeout:
            dropped.append({"client": k, "reason": f"timed out ({out.seconds:.1f}s > {run.client_timeout}s)"})
            continue
        reason = rejection_reason(
            res.update, sent=sent[k], capacity=plan.ranks[k], max_norm=run.max_update_norm or None
        )
        if reason is not None:
            dropped.append({"client": k, "reason": f"rejected: {reason}"})
            continue
        weight = plan.privacy.weight(res.update.num_examples)
        msg = client_sums(res.update, spec.max_rank, weight, reference=sent[k], rows=spec.rows)
        total = msg if total is None else total + msg
        aggregated.append(k)
    return RoundSums(total, aggregated, dropped, bytes_up, passes, examples)


def _padded_bytes(received: Adapter, max_rank: int) -> int:
    """Bytes of a padded message for modules shaped like ``received``, at rank ``max_rank``."""
    entries = sum(max_rank * (p.A.shape[1] + p.B.shape[0]) for p in received.values()) + max_rank
    return FLOAT_BYTES * entries


_BASE_METRICS: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def evaluate_per_rank(
    nested: NestedLoRA,
    rule: AggregationRule,
    state: ServerState,
    levels: Sequence[int],
    workload: Workload,
    on_level: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the global model as a client of each level holds it: ``rule.downlink`` at
    the level, with ``rule.fold`` added to the base weights where the rule folds (Fed-PLoRA).

    While B = 0 everywhere (round 0, every method) the model is the base model at every
    level, so it is evaluated once per workload and the result reused.
    """
    out: dict[str, dict[str, float]] = {}
    if state.base_delta is None and all(not bool(p.B.any()) for p in state.adapter.values()):
        base = _BASE_METRICS.get(workload)
        if base is None:
            nested.set_adapter(state.adapter)
            with torch.no_grad():
                base = _BASE_METRICS[workload] = workload.evaluate(nested.model)
        return {str(lv): dict(base) for lv in levels}
    for lv in levels:
        if on_level is not None:
            on_level(lv)
        nested.set_adapter(rule.downlink(state.adapter, lv))
        nested.set_rank(lv)
        fold = rule.fold(state.adapter, lv)
        with torch.no_grad(), folded(nested, state.base_delta, fold.delta if fold else None):
            out[str(lv)] = workload.evaluate(nested.model)
    return out


class RoundDriver:
    """Runs the rounds of one plan over one transport; ``nested`` is the server's model copy
    (evaluation, and FLoRA's merged base)."""

    def __init__(
        self,
        plan: RunPlan,
        transport: Transport,
        nested: NestedLoRA,
        workload: Workload,
        *,
        on_state: StateCallback | None = None,
        on_round: RoundCallback | None = None,
        progress: bool = False,
    ) -> None:
        self.plan = plan
        self.rule = plan.make_rule()
        self.transport = transport
        self.nested = nested
        self.workload = workload
        self.on_state = on_state
        self.on_round = on_round
        self.progress = progress
        self.view: RoundProgress | None = None

    # -- state ---------------------------------------------------------------------------------
    def start(self) -> tuple[ServerState, list[dict[str, Any]]]:
        """Round-0 state and its record (the base model evaluated at every level)."""
        state = initial_state(self.plan, self.nested.shapes())
        record = {
            "round": 0,
            "seconds": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "passes": 0,
            "examples": 0,
            "per_rank": self.evaluate(state),
        }
        if self.on_round:
            self.on_round(record)
        return state, [record]

    def sync(self, state: ServerState) -> None:
        """Bring the server's model in line with ``state`` (FLoRA: W = W0 + merged deltas)."""
        if state.base_delta is not None:
            self.nested.set_base_delta(state.base_delta)

    def evaluate(self, state: ServerState) -> dict[str, dict[str, float]]:
        on_level = self.view.evaluating if self.view is not None else None
        return evaluate_per_rank(
            self.nested, self.rule, state, self.plan.eval_levels, self.workload, on_level
        )

    # -- rounds --------------------------------------------------------------------------------
    def job(self, state: ServerState, k: int, t: int) -> ClientJob:
        """Client ``k``'s job in round ``t``: its downlink and, if the rule folds, its fold."""
        rank = state.client_ranks[k]
        received = self.rule.downlink(state.adapter, rank, client_id=k, round_=t)
        fold = self.rule.fold(state.adapter, rank, client_id=k, round_=t)
        if fold is None:
            return ClientJob(k, received)
        return ClientJob(k, received, fold.delta, fold.num_bytes)

    def run_round(self, t: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One federated round; returns the new state and the round's ``results.json`` record."""
        t0 = time.perf_counter()
        run = self.plan.cfg.run
        sampled = self.plan.sample(t)
        jobs = [self.job(state, k, t) for k in sampled]
        sent = {job.client_id: job.received for job in jobs}
        if self.view is not None:
            self.view.round_started(t, [(job.client_id, state.client_ranks[job.client_id]) for job in jobs])
        bytes_down = sum(
            adapter_num_bytes(job.received) + state.broadcast_bytes + job.fold_bytes for job in jobs
        )
        if self.plan.privacy is not None:
            return self.run_sum_round(t, state, jobs, t0, bytes_down)
        outcomes = {o.client_id: o for o in self.transport.execute(t, state, jobs)}
        t_train = time.perf_counter() - t0
        updates: list[ClientUpdate] = []
        dropped: list[dict[str, Any]] = []
        losses: list[float] = []
        bytes_up = passes = examples = 0
        wire_up: int | None = None
        for k in sampled:
            out = outcomes.get(k)
            if out is None:
                dropped.append({"client": k, "reason": "timed out (no reply before the round's deadline)"})
                continue
            if out.wire_bytes_up is not None:
                wire_up = (wire_up or 0) + out.wire_bytes_up
            if out.result is None:
                dropped.append({"client": k, "reason": out.error or "no result"})
                continue
            res = out.result
            bytes_up += adapter_num_bytes(res.update.adapter)
            passes += res.stats.passes
            examples += res.stats.examples
            if run.client_timeout and out.seconds > run.client_timeout:
                dropped.append(
                    {"client": k, "reason": f"timed out ({out.seconds:.1f}s > {run.client_timeout}s)"}
                )
                continue
            reason = rejection_reason(
                res.update,
                sent=sent[k],
                capacity=self.plan.ranks[k],
                max_norm=run.max_update_norm or None,
            )
            if reason is not None:
                dropped.append({"client": k, "reason": f"rejected: {reason}"})
                continue
            updates.append(res.update)
            losses.append(res.stats.loss)
        for d in dropped:
            log.warning("round %d: client %d dropped, %s", t, d["client"], d["reason"])
        skipped = len(updates) < run.min_clients
        if skipped:
            log.warning(
                "round %d: only %d valid update(s), fewer than run.min_clients = %d; global adapter kept",
                t,
                len(updates),
                run.min_clients,
            )
            state = replace(state, round=t)
        else:
            state, _ = server_update(state, self.rule, updates)
            self.sync(state)
        record: dict[str, Any] = {
            "round": t,
            "seconds": 0.0,
            "train_seconds": t_train,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "passes": passes,
            "examples": examples,
            "clients": sampled,
            "aggregated": [u.client_id for u in updates],
            "dropped": dropped,
            "skipped": skipped,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
        }
        if wire_up is not None:
            record["wire_bytes_up"] = wire_up
        return state, self.finish_record(t, state, record, t0)

    def finish_record(self, t: int, state: ServerState, record: dict[str, Any], t0: float) -> dict[str, Any]:
        """Add the wire bytes down, the evaluation (every ``eval_every`` rounds) and the time."""
        run = self.plan.cfg.run
        wire_down = getattr(self.transport, "wire_bytes_down", None)
        if wire_down is not None:
            record["wire_bytes_down"] = wire_down
        if t % run.eval_every == 0 or t == run.rounds:
            t_eval = time.perf_counter()
            record["per_rank"] = self.evaluate(state)
            record["eval_seconds"] = time.perf_counter() - t_eval
        record["seconds"] = time.perf_counter() - t0
        return record

    def run_sum_round(
        self, t: int, state: ServerState, jobs: Sequence[ClientJob], t0: float, bytes_down: int
    ) -> tuple[ServerState, dict[str, Any]]:
        """A ``[privacy]`` round (docs/design.md §4.9): the clients' delta-form messages are
        summed (by SecAgg+ where the transport has ``execute_sums``), the server adds the
        Gaussian noise to the sum (DP) and divides row by row. Per-client losses are not
        released (``train_loss`` NaN); per-client validation is the summing party's."""
        privacy = self.plan.privacy
        assert privacy is not None
        run = self.plan.cfg.run
        sampled = [job.client_id for job in jobs]
        rows = sent_rows([state.client_ranks[k] for k in sampled], self.plan.levels, privacy.min_owners())
        spec = SumSpec(self.plan.max_rank, rows)
        execute_sums = getattr(self.transport, "execute_sums", None)
        if execute_sums is not None:
            rs: RoundSums = execute_sums(t, state, jobs, spec)
        else:
            outcomes = {o.client_id: o for o in self.transport.execute(t, state, jobs)}
            rs = sum_outcomes(
                self.plan, outcomes, sampled, {job.client_id: job.received for job in jobs}, spec
            )
        t_train = time.perf_counter() - t0
        for d in rs.dropped:
            log.warning("round %d: client %d dropped, %s", t, d["client"], d["reason"])
        skipped = rs.sums is None or len(rs.aggregated) < run.min_clients or rows == 0
        if skipped:
            log.warning(
                "round %d: %d client(s) in the sum (run.min_clients = %d), %d rank rows with enough "
                "owners; global adapter kept",
                t,
                len(rs.aggregated),
                run.min_clients,
                rows,
            )
            state = replace(state, round=t)
        else:
            assert rs.sums is not None
            counts = owner_counts([state.client_ranks[k] for k in rs.aggregated], self.plan.max_rank, rows)
            sums = rs.sums
            if privacy.dp:  # central DP: noise on the (unmasked) sum, divided by the public counts
                sums = privatize(sums, counts, privacy.noise_std, noise_generator(privacy, self.plan.seed, t))
                denominator = counts
            else:  # data weights: the summed weights, on the rows someone owned
                denominator = torch.where(counts > 0, sums.weight, torch.zeros_like(sums.weight))
            state = server_update_from_sums(state, sums, denominator=denominator, rule=self.rule)
        record: dict[str, Any] = {
            "round": t,
            "seconds": 0.0,
            "train_seconds": t_train,
            "bytes_up": rs.bytes_up,
            "bytes_down": bytes_down,
            "passes": rs.passes,
            "examples": rs.examples,
            "clients": sampled,
            "aggregated": list(rs.aggregated),
            "dropped": rs.dropped,
            "skipped": skipped,
            "train_loss": float("nan"),
            "rows": rows,
        }
        if rs.wire_bytes_up is not None:
            record["wire_bytes_up"] = rs.wire_bytes_up
        return state, self.finish_record(t, state, record, t0)

    def run(
        self, state: ServerState, rounds: list[dict[str, Any]]
    ) -> tuple[ServerState, list[dict[str, Any]]]:
        """Rounds ``state.round + 1 .. run.rounds``; ``rounds`` holds the records so far."""
        rounds = list(rounds)
        self.sync(state)
        cfg = self.plan.cfg
        if self.progress:
            self.view = RoundProgress(self.plan, done=state.round)
        if hasattr(self.transport, "view"):
            self.transport.view = self.view
        try:
            for t in range(state.round + 1, cfg.run.rounds + 1):
                state, record = self.run_round(t, state)
                rounds.append(record)
                if self.on_state:
                    self.on_state(state, rounds)
                if self.on_round:
                    self.on_round(record)
                if self.view is not None:
                    self.view.round_done(record)
        finally:
            if self.view is not None:
                self.view.stop()
            self.view = None
            if hasattr(self.transport, "view"):
                self.transport.view = None
        return state, rounds

    def results(self, state: ServerState, rounds: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        """The ``results.json`` dict (docs/design.md §7)."""
        return results_dict(self.plan, state, rounds, seconds)


def results_dict(
    plan: RunPlan, state: ServerState, rounds: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """The ``results.json`` content: per-round records, final per-rank metrics and totals.

    ``family`` says what a per-rank column means (docs/design.md §4); ``total_passes`` counts
    forward/backward passes over all clients and rounds (docs/design.md §3).
    """
    cfg, method = plan.cfg, plan.method
    out: dict[str, Any] = {
        "method": method.name,
        "family": method.family,
        "seed": plan.seed,
        "ranks": list(plan.capacities),
        "effective_ranks": list(plan.ranks),
        "final_ranks": list(state.client_ranks),
        "levels": list(plan.eval_levels),
        "client_levels": list(plan.levels),
        "rounds": rounds,
        "final": {"per_rank": rounds[-1]["per_rank"]},
        "total_seconds": seconds,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_passes": sum(r.get("passes", 0) for r in rounds),
        "total_examples": sum(r.get("examples", 0) for r in rounds),
        "config": config_to_dict(cfg),
        "summary": method.summary,
    }
    if method.level is not None:
        out["oracle_level"] = method.level
    if method.rule in ORDER_RULES:  # ``aggregation.order = "auto"`` resolved
        out["resolved"] = {"aggregation.order": plan.order, "aggregation.split": cfg.aggregation.split}
    if plan.privacy is not None:
        out["privacy"] = privacy_report(plan.privacy, state.round)
    return out


def run_in_folder(
    driver: RoundDriver,
    out: Path,
    *,
    log_line: Callable[[str], None] = log.info,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``driver``'s plan in ``out``: config.toml, a checkpoint and the global
    adapter after every round, results.json at the end (docs/design.md §8)."""
    from prelort.federation.artifacts import save_global
    from prelort.federation.checkpoint import load_checkpoint, save_checkpoint
    from prelort.reporting.files import atomic_write_text, write_results

    cfg = driver.plan.cfg
    start = time.perf_counter()
    resume = load_checkpoint(out, cfg, log=log_line)
    earlier = 0.0  # seconds spent by the processes before a resume, from their round records
    if resume is not None:
        log_line(f"resuming {out} after round {resume[0].round}")
        state, rounds = resume[0], list(resume[1])
        earlier = sum(float(r.get("seconds", 0.0)) for r in rounds)
    else:
        atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
        state, rounds = driver.start()
    user_on_state = driver.on_state

    def on_state(s: ServerState, r: list[dict[str, Any]]) -> None:
        save_checkpoint(out, s, r, cfg)
        save_global(out, s)
        if user_on_state:
            user_on_state(s, r)

    driver.on_state = on_state
    user_on_round = driver.on_round
    board = TensorBoardLog(out / "tensorboard") if cfg.run.tensorboard else None
    if board is not None:
        for record in rounds:  # what an earlier, interrupted process already logged is rewritten
            board(record)

        def on_round(record: dict[str, Any]) -> None:
            assert board is not None
            board(record)
            if user_on_round:
                user_on_round(record)

        driver.on_round = on_round
    try:
        state, rounds = driver.run(state, rounds)
    finally:
        driver.on_state, driver.on_round = user_on_state, user_on_round
        if board is not None:
            board.close()
    results = driver.results(state, rounds, earlier + time.perf_counter() - start)
    results.update(extra or {})
    write_results(out, results, cfg)
    return results


def round_line(record: dict[str, Any]) -> str:
    """A one-line summary of a round record for the console."""
    line = f"round {record['round']}: {record['seconds']:.1f}s, train loss {record['train_loss']:.4g}"
    if record.get("dropped"):
        line += f", {len(record['dropped'])} dropped"
    if "per_rank" in record:
        parts = []
        for lv, metrics in record["per_rank"].items():
            key = next((k for k in ("accuracy", "rouge_l", "rel_loss") if k in metrics), "loss")
            parts.append(f"r{lv} {key}={metrics[key]:.4g}")
        line += "; " + ", ".join(parts)
    return line


class RoundProgress:
    """What a person watches: a bar over rounds, and one over the current round's client steps
    (in-process) with the client and its rank, then the rank level being evaluated."""

    def __init__(self, plan: RunPlan, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.plan = plan
        cfg = plan.cfg
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.rounds = self.bar.add_task(f"{cfg.run.method} seed {cfg.run.seed}", total=cfg.run.rounds)
        self.inner = self.bar.add_task("", total=1, visible=False)
        self.bar.update(self.rounds, completed=done)
        self.t = 0
        self.clients: list[tuple[int, int]] = []
        self.bar.start()

    def round_started(self, t: int, clients: list[tuple[int, int]]) -> None:
        """Round ``t`` sends to ``clients`` = [(client id, rank)]."""
        self.t, self.clients = t, clients
        total = sum(self.plan.local_config(r, t).steps for _, r in clients)
        self.bar.update(
            self.inner, description=f"round {t}: training", total=total, completed=0, visible=True
        )

    def client_started(self, index: int, client_id: int, rank: int) -> None:
        self.bar.update(
            self.inner,
            description=f"round {self.t}: client {client_id} (rank {rank}), {index + 1}/{len(self.clients)}",
        )

    def step(self) -> None:
        self.bar.advance(self.inner)

    def evaluating(self, level: int) -> None:
        self.bar.update(self.inner, description=f"evaluating at rank {level}", visible=True)

    def round_done(self, record: dict[str, Any]) -> None:
        self.bar.update(self.inner, visible=False)
        self.bar.advance(self.rounds)
        self.bar.console.print(round_line(record))

    def stop(self) -> None:
        self.bar.stop()


class TensorBoardLog:
    """TensorBoard event files of a run (``run.tensorboard``): per round the train loss, bytes,
    passes and examples, and every evaluated metric per rank level as ``r{level}/{metric}``."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional extra
            from prelort.errors import UserError

            raise UserError(
                f"run.tensorboard = true needs the tensorboard package ({exc}); "
                "pip install 'prelort[tensorboard]' or set run.tensorboard = false"
            ) from None
        self.writer = SummaryWriter(str(folder))

    def __call__(self, record: dict[str, Any]) -> None:
        t = int(record["round"])
        for key in ("train_loss", "bytes_up", "bytes_down", "passes", "examples", "seconds"):
            value = record.get(key)
            if isinstance(value, int | float) and value == value:  # skip NaN
                self.writer.add_scalar(f"round/{key}", value, t)
        for level, metrics in record.get("per_rank", {}).items():
            for name, value in metrics.items():
                self.writer.add_scalar(f"r{level}/{name}", value, t)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
