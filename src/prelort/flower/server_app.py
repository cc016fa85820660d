"""The Flower ``ServerApp``: discover the nodes, run the round driver, write ``results.json``.

1. Read the run config (an optional ``config`` file, the flat config keys and ``set``
   overrides, see ``settings`` and ``run_config``) into the same validated ``Config`` as
   ``prelort run``.
2. QUERY round: wait for ``clients.num_clients`` SuperNodes (where the run sets it nowhere:
   as many as the federation has) and ask each for its ``partition-id`` and ``rank``; the
   nodes' ranks become ``clients.ranks``.
3. Build the workload on the server (for the adapter shapes and central evaluation).
4. Rounds: ``RoundDriver`` with a ``FlowerTransport`` (docs/design.md §6): the same sampling,
   validation, ``server_update``, round records and evaluation as ``prelort run``.
5. ``run_in_folder`` writes ``results.json``, ``config.toml``, the global adapter and a
   checkpoint every round (a restarted run with the same ``out`` resumes) to the ``out``
   folder on the SuperLink host.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from prelort.config import Config
from prelort.errors import UserError
from prelort.flower.records import as_int
from prelort.flower.settings import (
    NodeInfo,
    RunSettings,
    settings_from_run_config,
    with_node_ranks,
    with_num_clients,
)
from prelort.flower.transport import send_and_receive

log = logging.getLogger("flwr")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by ``flwr-serverapp`` (or the simulation engine)."""
    try:
        settings = settings_from_run_config(context.run_config)
        cfg, follow = settings.resolve()
    except UserError as exc:
        log.error("prelort: error: %s", exc)
        raise
    out = Path(settings.out or f"prelort-flower-{context.run_id}").expanduser().absolute()
    if follow:
        cfg, note = with_num_clients(cfg, federation_size(grid, settings))
        log.info("prelort: %s", note)
    results = run_federation(grid, cfg, settings, out, run_id=context.run_id)
    final = results["final"]["per_rank"]
    log.info("final per-rank metrics: %s", final)
    log.info("wrote %s", out / "results.json")


SETTLE_SECONDS = 2.0
"""A federation's size is read once its number of SuperNodes has not changed for this long."""


def federation_size(grid: Grid, settings: RunSettings) -> int:
    """The number of SuperNodes connected, once at least one is and the count is steady.

    On the simulation engine every virtual SuperNode exists before the ServerApp starts; on
    a deployment, SuperNodes that connect later than ``SETTLE_SECONDS`` after the others
    are missed: set ``clients.num_clients`` there.
    """
    deadline = time.monotonic() + settings.node_timeout
    count, since = -1, time.monotonic()
    while True:
        now = time.monotonic()
        n = len(list(grid.get_node_ids()))
        if n != count:
            count, since = n, now
        elif n > 0 and now - since >= SETTLE_SECONDS:
            return n
        if now > deadline:
            if n > 0:
                return n
            raise RuntimeError(
                f"no SuperNode connected within {settings.node_timeout:g} s (run config node-timeout)"
            )
        time.sleep(min(0.5, settings.poll_interval))


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

    The rounds are ``RoundDriver``'s, as in ``prelort run``, with a ``FlowerTransport``.
    After every round the server state is checkpointed in ``out`` and the global adapter
    saved; a run started again with the same ``out`` and config resumes after the last
    completed round.
    """
    from prelort.federation.driver import RoundDriver
    from prelort.federation.plan import build_plan
    from prelort.federation.run_folder import run_in_folder
    from prelort.federation.simulator import build_nested
    from prelort.flower.transport import FlowerTransport
    from prelort.workloads import build_workload

    found = discover_nodes(grid, cfg.clients.num_clients, settings)
    cfg = with_node_ranks(cfg, {k: info for k, (_, info) in found.items()})
    workload = build_workload(cfg)
    plan = build_plan(cfg)
    nested = build_nested(plan, workload)
    wait = settings.round_timeout
    if cfg.run.client_timeout:
        wait = min(wait, cfg.run.client_timeout)
    nodes = {k: node for k, (node, _) in found.items()}
    transport: FlowerTransport
    if plan.privacy is not None and plan.privacy.secure:  # SecAgg+: the driver only sees sums
        from prelort.flower.secure import SecureFlowerTransport

        transport = SecureFlowerTransport(grid, plan, nodes, timeout=wait, poll=settings.poll_interval)
    else:
        transport = FlowerTransport(grid, cfg, nodes, timeout=wait, poll=settings.poll_interval)
    driver = RoundDriver(plan, transport, nested, workload)
    log.info("PreLort over Flower: run %d, method %r, results to %s", run_id, plan.method.name, out)
    for k, node in sorted(nodes.items()):
        log.info("\tclient %d: rank %d, node %d", k, plan.ranks[k], node)
    engine = {  # Flower ids are 64-bit: kept as strings for JSON readers without int64
        "name": "flower",
        "run_id": str(run_id),
        "nodes": {str(k): str(node) for k, node in sorted(nodes.items())},
        # the transport updates this dict in place; it is read when results.json is written
        "workers": transport.worker_stats,
    }
    return run_in_folder(driver, out, log_line=log.info, extra={"engine": engine})
