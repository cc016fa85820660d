"""The Flower ``ServerApp``: discover the nodes, run ``PrefixStrategy``, write ``results.json``.

1. Read the run config (``config`` file + ``set`` overrides, see ``settings``) into the same
   validated ``Config`` as ``prelort run``.
2. Build the workload on the server (for the adapter shapes and central evaluation).
3. QUERY round: wait for ``clients.num_clients`` SuperNodes and ask each for its
   ``partition-id`` and ``rank``; the nodes' ranks become ``clients.ranks``.
4. Rounds: ``configure_train`` -> push/pull -> ``aggregate_train`` (``server_update``), then
   ``evaluate_per_rank`` every ``eval_every`` rounds, exactly like ``run_simulation``.
5. Write ``results.json``, ``config.toml`` (``write_results``), the global adapter
   (``save_global``) and a checkpoint (``save_checkpoint``, every round: a restarted run
   with the same ``out`` resumes) to the ``out`` folder on the SuperLink host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from prelort.config import Config
from prelort.errors import UserError
from prelort.flower.records import adapter_to_record, as_int
from prelort.flower.settings import NodeInfo, RunSettings, settings_from_run_config, with_node_ranks

log = logging.getLogger("flwr")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by ``flwr-serverapp`` (or the simulation engine)."""
    try:
        settings = settings_from_run_config(context.run_config)
        cfg = settings.load()
    except UserError as exc:
        log.error("prelort: error: %s", exc)
        raise
    out = Path(settings.out or f"prelort-flower-{context.run_id}").expanduser().absolute()
    results = run_federation(grid, cfg, settings, out, run_id=context.run_id)
    final = results["final"]["per_rank"]
    log.info("final per-rank metrics: %s", final)
    log.info("wrote %s", out / "results.json")


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float, poll: float
) -> list[Message]:
    """Push ``messages`` and pull their replies every ``poll`` seconds until all are in or timeout.

    Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls, which dominates a round on
    small workloads; this is the same loop with a configurable interval.
    """
    messages = list(messages)
    if not messages:
        return []
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll)
    return replies


def discover_nodes(grid: Grid, num_clients: int, settings: RunSettings) -> dict[int, tuple[int, NodeInfo]]:
    """Wait for ``num_clients`` SuperNodes, then QUERY each: client id -> (node id, NodeInfo)."""
    deadline = time.monotonic() + settings.node_timeout
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(node_ids)} of clients.num_clients = {num_clients} SuperNodes connected within "
                f"{settings.node_timeout:g} s; start one SuperNode per client with "
                "--node-config 'partition-id=K rank=R' (or raise the run config's node-timeout)"
            )
        time.sleep(min(1.0, settings.poll_interval * 5))
    queries = [
        Message(
            RecordDict({"query": ConfigRecord({"want": "partition-id,rank"})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    replies = send_and_receive(grid, queries, timeout=settings.node_timeout, poll=settings.poll_interval)
    found: dict[int, tuple[int, NodeInfo]] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise RuntimeError(f"SuperNode {node} failed the QUERY round: {msg.error.reason}")
        rec = msg.content.config_records["node"]
        rank = as_int(rec["rank"], "rank")
        info = NodeInfo(as_int(rec["partition-id"], "partition-id"), rank if rank > 0 else None)
        if info.partition_id in found:
            raise UserError(
                f"SuperNodes {found[info.partition_id][0]} and {node} both have partition-id "
                f"{info.partition_id}; give each SuperNode its own --node-config partition-id"
            )
        found[info.partition_id] = (node, info)
    if len(found) < len(node_ids):
        raise RuntimeError(f"only {len(found)} of {len(node_ids)} SuperNodes answered the QUERY round")
    return found


def run_federation(
    grid: Grid, cfg: Config, settings: RunSettings, out: Path, *, run_id: int = 0
) -> dict[str, Any]:
    """The whole federated training over ``grid``; returns (and writes) the results dict.

    After every round the server state is checkpointed in ``out`` (``save_checkpoint``) and
    the global adapter saved (``save_global``), as ``prelort run`` does; a run started again
    with the same ``out`` and config resumes after the last completed round.
    """
    from prelort.config import config_to_dict, dump_toml
    from prelort.federation.artifacts import save_global
    from prelort.federation.checkpoint import load_checkpoint, save_checkpoint
    from prelort.federation.simulator import build_nested, evaluate_per_rank, results_dict
    from prelort.flower.strategy import PrefixStrategy
    from prelort.reporting.files import atomic_write_text, write_results
    from prelort.workloads import build_workload

    start = time.perf_counter()
    workload = build_workload(cfg)
    nested = build_nested(cfg, workload)
    found = discover_nodes(grid, cfg.clients.num_clients, settings)
    cfg = with_node_ranks(cfg, {k: info for k, (_, info) in found.items()})
    levels = cfg.run.eval_levels or cfg.clients.levels
    resume = load_checkpoint(out, cfg, log=log.warning)
    if resume is None:
        strategy = PrefixStrategy(cfg, {k: node for k, (node, _) in found.items()}, nested.shapes())
        atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
        per_rank0 = evaluate_per_rank(nested, strategy.rule, strategy.state, levels, workload)
        rounds: list[dict[str, Any]] = [
            {"round": 0, "seconds": 0.0, "bytes_up": 0, "bytes_down": 0, "per_rank": per_rank0}
        ]
    else:
        state, rounds = resume[0], list(resume[1])
        strategy = PrefixStrategy(cfg, {k: node for k, (node, _) in found.items()}, nested.shapes(), state)
        if state.base_delta is not None:
            nested.set_base_delta(state.base_delta)
        log.info("resuming %s after round %d", out, state.round)
    log.info("PreLort over Flower: run %d, results to %s", run_id, out)
    strategy.summary()
    wait = settings.round_timeout
    if cfg.run.client_timeout:
        wait = min(wait, cfg.run.client_timeout)
    arrays = adapter_to_record(strategy.state.adapter)
    for t in range(strategy.state.round + 1, cfg.run.rounds + 1):
        t0 = time.perf_counter()
        messages = strategy.configure_train(t, arrays, ConfigRecord(), grid)
        replies = send_and_receive(grid, messages, timeout=wait, poll=settings.poll_interval)
        t_train = time.perf_counter() - t0
        new_arrays, _ = strategy.aggregate_train(t, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if strategy.state.base_delta is not None:  # FLoRA: W = W0 + accumulated merges
            nested.set_base_delta(strategy.state.base_delta)
        record = strategy.round_log.record(t)
        record["train_seconds"] = t_train
        if t % cfg.run.eval_every == 0 or t == cfg.run.rounds:
            t_eval = time.perf_counter()
            record["per_rank"] = evaluate_per_rank(nested, strategy.rule, strategy.state, levels, workload)
            record["eval_seconds"] = time.perf_counter() - t_eval
        record["seconds"] = time.perf_counter() - t0
        rounds.append(record)
        save_checkpoint(out, strategy.state, rounds, cfg)
        save_global(out, strategy.state)
        log.info(
            "round %d: %.1fs, train loss %.4g%s",
            t,
            record["seconds"],
            record["train_loss"],
            f"; per rank {record['per_rank']}" if "per_rank" in record else "",
        )

    results = results_dict(
        cfg, list(strategy.capacities), strategy.state, rounds, time.perf_counter() - start
    )
    results["engine"] = {  # Flower ids are 64-bit: kept as strings for JSON readers without int64
        "name": "flower",
        "run_id": str(run_id),
        "nodes": {str(k): str(node) for k, (node, _) in sorted(found.items())},
    }
    write_results(out, results, cfg)
    return results
