"""In-process federated simulation: one base model in memory, clients run one after another.

Each round: sample clients (seeded), send each the downlink of its rank, run
``client_update``, drop clients that raise or exceed the timeout, reject invalid updates,
aggregate the rest with ``server_update`` (if at least ``min_clients`` remain), evaluate the
global adapter at every rank level every ``eval_every`` rounds, and count bytes up and down.
A run can resume from a checkpoint (``state`` and ``rounds``) and ends identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import adapter_num_bytes
from prelort.aggregation.base import AggregationRule, ClientUpdate
from prelort.config import Config, config_to_dict
from prelort.federation.core import (
    ClientResult,
    ServerState,
    assign_ranks,
    client_update,
    effective_ranks,
    initial_state,
    make_rule,
    make_scaling,
    sample_clients,
    server_update,
)
from prelort.federation.methods import get_method
from prelort.federation.validation import rejection_reason
from prelort.federation.workload import Workload

log = logging.getLogger("prelort")

RoundCallback = Callable[[dict[str, Any]], None]
StateCallback = Callable[[ServerState, list[dict[str, Any]]], None]
ClientFn = Callable[..., ClientResult]


_BASE_METRICS: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def evaluate_per_rank(
    nested: NestedLoRA, rule: AggregationRule, state: ServerState, levels: list[int], workload: Workload
) -> dict[str, dict[str, float]]:
    """Metrics of the global adapter truncated at every level (the rule's rank-l downlink).

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
        nested.set_adapter(rule.downlink(state.adapter, lv))
        nested.set_rank(lv)
        with torch.no_grad():
            out[str(lv)] = workload.evaluate(nested.model)
    return out


def build_nested(cfg: Config, workload: Workload) -> NestedLoRA:
    targets = cfg.lora.target_modules or workload.target_modules
    return NestedLoRA(workload.build_model(), targets, make_scaling(cfg), dropout=cfg.lora.dropout)


def run_round(
    t: int,
    state: ServerState,
    nested: NestedLoRA,
    rule: AggregationRule,
    cfg: Config,
    workload: Workload,
    capacities: list[int],
    client_fn: ClientFn = client_update,
) -> tuple[ServerState, dict[str, Any]]:
    """One federated round; returns the new state and the round's record."""
    t0 = time.perf_counter()
    sampled = sample_clients(cfg.run.seed, t, cfg.clients.num_clients, cfg.run.clients_per_round)
    updates: list[ClientUpdate] = []
    dropped: list[dict[str, Any]] = []
    bytes_up = bytes_down = 0
    losses: list[float] = []
    for k in sampled:
        received = rule.downlink(state.adapter, state.client_ranks[k])
        bytes_down += adapter_num_bytes(received) + state.broadcast_bytes
        started = time.perf_counter()
        try:
            res = client_fn(nested, received, client_id=k, round_=t, cfg=cfg, workload=workload)
        except Exception as exc:  # an unreliable client must not stop the federation
            dropped.append({"client": k, "reason": f"raised {type(exc).__name__}: {exc}"})
            continue
        elapsed = time.perf_counter() - started
        bytes_up += adapter_num_bytes(res.update.adapter)
        if cfg.run.client_timeout and elapsed > cfg.run.client_timeout:
            dropped.append({"client": k, "reason": f"timed out ({elapsed:.1f}s > {cfg.run.client_timeout}s)"})
            continue
        reason = rejection_reason(
            res.update, sent=received, capacity=capacities[k], max_norm=cfg.run.max_update_norm or None
        )
        if reason is not None:
            dropped.append({"client": k, "reason": f"rejected: {reason}"})
            continue
        updates.append(res.update)
        losses.append(res.stats.loss)
    for d in dropped:
        log.warning("round %d: client %d dropped, %s", t, d["client"], d["reason"])
    skipped = len(updates) < cfg.run.min_clients
    if skipped:
        log.warning(
            "round %d: only %d valid update(s), fewer than run.min_clients = %d; global adapter kept",
            t,
            len(updates),
            cfg.run.min_clients,
        )
        from dataclasses import replace

        state = replace(state, round=t)
    else:
        state, _ = server_update(state, rule, updates)
        if state.base_delta is not None:
            nested.set_base_delta(state.base_delta)
    record: dict[str, Any] = {
        "round": t,
        "seconds": 0.0,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "clients": sampled,
        "aggregated": [u.client_id for u in updates],
        "dropped": dropped,
        "skipped": skipped,
        "train_loss": sum(losses) / len(losses) if losses else float("nan"),
    }
    record["seconds"] = time.perf_counter() - t0
    return state, record


def run_simulation(
    cfg: Config,
    workload: Workload,
    *,
    on_round: RoundCallback | None = None,
    on_state: StateCallback | None = None,
    progress: bool = False,
    resume: tuple[ServerState, list[dict[str, Any]]] | None = None,
    client_fn: ClientFn = client_update,
) -> dict[str, Any]:
    """Run a whole federated training and return the ``results.json`` dict (DESIGN.md §3).

    ``on_state(state, rounds)`` is called after every round (checkpointing); ``resume``
    continues from such a saved state and the rounds recorded so far.
    """
    method = get_method(cfg.run.method)
    nested = build_nested(cfg, workload)
    rule = make_rule(cfg, method)
    levels = cfg.run.eval_levels or cfg.clients.levels
    capacities = effective_ranks(method, assign_ranks(cfg), cfg.clients.levels)
    start = time.perf_counter()
    if resume is None:
        state = initial_state(cfg, nested.shapes())
        rounds: list[dict[str, Any]] = []
        per_rank0 = evaluate_per_rank(nested, rule, state, levels, workload)
        rounds.append({"round": 0, "seconds": 0.0, "bytes_up": 0, "bytes_down": 0, "per_rank": per_rank0})
        if on_round:
            on_round(rounds[-1])
    else:
        state, rounds = resume[0], list(resume[1])
        if state.base_delta is not None:
            nested.set_base_delta(state.base_delta)

    bar = _progress_bar(cfg.run.rounds, f"{cfg.run.method} seed {cfg.run.seed}") if progress else None
    if bar is not None:
        bar[0].update(bar[1], completed=state.round)
    try:
        for t in range(state.round + 1, cfg.run.rounds + 1):
            state, record = run_round(t, state, nested, rule, cfg, workload, capacities, client_fn)
            if t % cfg.run.eval_every == 0 or t == cfg.run.rounds:
                t_eval = time.perf_counter()
                record["per_rank"] = evaluate_per_rank(nested, rule, state, levels, workload)
                record["eval_seconds"] = time.perf_counter() - t_eval
            rounds.append(record)
            if on_state:
                on_state(state, rounds)
            if on_round:
                on_round(record)
            if bar is not None:
                bar[0].update(bar[1], advance=1)
                bar[0].console.print(_round_line(record))
    finally:
        if bar is not None:
            bar[0].stop()

    return results_dict(cfg, capacities, state, rounds, time.perf_counter() - start)


def results_dict(
    cfg: Config, capacities: list[int], state: ServerState, rounds: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """The ``results.json`` content (DESIGN.md §3), shared by the simulator and the Flower app."""
    return {
        "method": cfg.run.method,
        "seed": cfg.run.seed,
        "ranks": assign_ranks(cfg),
        "effective_ranks": list(capacities),
        "final_ranks": list(state.client_ranks),
        "levels": cfg.run.eval_levels or cfg.clients.levels,
        "client_levels": cfg.clients.levels,
        "rounds": rounds,
        "final": {"per_rank": rounds[-1]["per_rank"]},
        "total_seconds": seconds,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "config": config_to_dict(cfg),
        "summary": get_method(cfg.run.method).summary,
    }


def _round_line(record: dict[str, Any]) -> str:
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


def _progress_bar(total: int, label: str) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = prog.add_task(label, total=total)
    prog.start()
    return prog, task
