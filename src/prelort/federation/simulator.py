"""In-process federated simulation: one base model in memory, clients run one after another.

Each round: sample clients (seeded), send each the downlink of its rank, run
``client_update``, aggregate with ``server_update``, evaluate the global adapter at every
rank level every ``eval_every`` rounds, and count bytes up and down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import adapter_num_bytes
from prelort.aggregation.base import AggregationRule
from prelort.config import Config, config_to_dict
from prelort.federation.core import (
    ServerState,
    assign_ranks,
    client_update,
    initial_state,
    make_rule,
    make_scaling,
    sample_clients,
    server_update,
)
from prelort.federation.methods import get_method
from prelort.federation.workload import Workload

RoundCallback = Callable[[dict[str, Any]], None]
StateCallback = Callable[[ServerState], None]


def evaluate_per_rank(
    nested: NestedLoRA,
    rule: AggregationRule,
    state: ServerState,
    levels: list[int],
    workload: Workload,
) -> dict[str, dict[str, float]]:
    """Metrics of the global adapter truncated at every level (the rule's rank-l downlink)."""
    out: dict[str, dict[str, float]] = {}
    for lv in levels:
        nested.set_adapter(rule.downlink(state.adapter, lv))
        nested.set_rank(lv)
        with torch.no_grad():
            out[str(lv)] = workload.evaluate(nested.model)
    return out


def build_nested(cfg: Config, workload: Workload) -> NestedLoRA:
    targets = cfg.lora.target_modules or workload.target_modules
    return NestedLoRA(workload.build_model(), targets, make_scaling(cfg), dropout=cfg.lora.dropout)


def run_simulation(
    cfg: Config,
    workload: Workload,
    *,
    on_round: RoundCallback | None = None,
    on_state: StateCallback | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a whole federated training and return the ``results.json`` dict (DESIGN.md §3)."""
    method = get_method(cfg.run.method)
    nested = build_nested(cfg, workload)
    rule = make_rule(cfg, method)
    state = initial_state(cfg, nested.shapes())
    levels = cfg.clients.levels
    rounds: list[dict[str, Any]] = []
    start = time.perf_counter()
    per_rank0 = evaluate_per_rank(nested, rule, state, levels, workload)
    rounds.append(
        {"round": 0, "seconds": 0.0, "bytes_up": 0, "bytes_down": 0, "per_rank": per_rank0}
    )
    if on_round:
        on_round(rounds[-1])

    bar = (
        _progress_bar(cfg.run.rounds, f"{cfg.run.method} seed {cfg.run.seed}") if progress else None
    )
    try:
        for t in range(1, cfg.run.rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_clients(
                cfg.run.seed, t, cfg.clients.num_clients, cfg.run.clients_per_round
            )
            updates = []
            bytes_up = bytes_down = 0
            train_loss = 0.0
            for k in sampled:
                received = rule.downlink(state.adapter, state.client_ranks[k])
                bytes_down += adapter_num_bytes(received) + state.broadcast_bytes
                res = client_update(
                    nested, received, client_id=k, round_=t, cfg=cfg, workload=workload
                )
                bytes_up += adapter_num_bytes(res.update.adapter)
                train_loss += res.stats.loss / len(sampled)
                updates.append(res.update)
            state, result = server_update(state, rule, updates)
            if result.base_delta is not None:
                nested.add_to_base(result.base_delta)
            record: dict[str, Any] = {
                "round": t,
                "seconds": 0.0,
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "clients": sampled,
                "train_loss": train_loss,
            }
            if t % cfg.run.eval_every == 0 or t == cfg.run.rounds:
                record["per_rank"] = evaluate_per_rank(nested, rule, state, levels, workload)
            record["seconds"] = time.perf_counter() - t0
            rounds.append(record)
            if on_state:
                on_state(state)
            if on_round:
                on_round(record)
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar is not None:
            bar[0].stop()

    return {
        "method": cfg.run.method,
        "seed": cfg.run.seed,
        "ranks": assign_ranks(cfg),
        "effective_ranks": list(initial_state(cfg, nested.shapes()).client_ranks),
        "final_ranks": list(state.client_ranks),
        "levels": levels,
        "rounds": rounds,
        "final": {"per_rank": rounds[-1]["per_rank"]},
        "total_seconds": time.perf_counter() - start,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "config": config_to_dict(cfg),
        "summary": method.summary,
    }


def _progress_bar(total: int, label: str) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    task = prog.add_task(label, total=total)
    prog.start()
    return prog, task
