"""The Flower transport of the round driver: client updates as Message-API TRAIN messages.

Flower's stock strategies (FedAvg, server-side DP, SecAgg+) assume every client holds arrays
of the same shape; heterogeneous-rank LoRA breaks that, so the ServerApp does not use a
Flower ``Strategy``. It runs ``prelort.federation.driver.RoundDriver`` (the same rounds as
the in-process simulator) with this transport, which per round

- sends client k (the SuperNode whose ``partition-id`` is k) one message with its downlink
  (``rule.downlink(global, r_k)``: the rank-r_k prefix, FlexLoRA's rank-r_k SVD factors, ...),
  the run config, and the downlink's base delta where the rule gives one (FLoRA's merged
  updates, because a fresh ClientApp process starts from the original base model; Fed-PLoRA's
  fold of the modules the client does not train);
- pushes the messages, pulls the replies until all are in or the round's deadline passes
  (``send_and_receive``), and turns each reply into a ``ClientOutcome``: an error reply or a
  malformed one becomes a dropped client with its reason, a missing one a timeout.

It also counts the ClientApp processes that answered and the workloads (base models) they
built (``worker_stats``): one per message in a deployment, where every message gets a fresh
process, one per Ray actor on Flower's simulation engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from prelort.aggregation.base import ClientUpdate
from prelort.config import Config
from prelort.federation.core import ClientResult, ServerState
from prelort.federation.transport import ClientJob, ClientOutcome
from prelort.flower.records import (
    ADAPTER,
    BASE_DELTA,
    CONFIG,
    METRICS,
    WORKER,
    adapter_to_record,
    as_float,
    as_int,
    record_to_adapter,
    tensors_to_record,
)
from prelort.flower.settings import config_to_json
from prelort.training.local import TrainStats

log = logging.getLogger("flwr")


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


class FlowerTransport:
    """Executes a round's client jobs on SuperNodes through a Flower ``Grid``.

    ``nodes`` maps client id (the node's ``partition-id``) to its Flower node id.
    ``wire_bytes_down`` of the last round is kept for the round record. ``worker_stats``
    (updated in place after every round) counts the distinct ClientApp processes that
    replied (``client_processes``) and the workloads they built (``model_builds``).
    """

    def __init__(
        self, grid: Grid, cfg: Config, nodes: Mapping[int, int], *, timeout: float, poll: float
    ) -> None:
        self.grid, self.nodes, self.timeout, self.poll = grid, dict(nodes), timeout, poll
        self._config_json = config_to_json(cfg)
        self.wire_bytes_down = 0
        self.worker_stats: dict[str, int] = {"client_processes": 0, "model_builds": 0}
        self._builds: dict[str, int] = {}  # process -> workloads it has built so far

    def messages(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[Message]:
        """One TRAIN message per job with its downlink, the config and, where the rule gives
        one, the base delta (FLoRA's merged updates, Fed-PLoRA's fold), dense."""
        out = []
        self.wire_bytes_down = 0
        for job in jobs:
            record = adapter_to_record(job.received)
            conf = {"server-round": round_, "client-id": job.client_id, "prelort-config": self._config_json}
            content = RecordDict({ADAPTER: record, CONFIG: ConfigRecord(conf)})  # type: ignore[arg-type]
            self.wire_bytes_down += record.count_bytes()
            if job.base is not None:
                base = tensors_to_record(job.base)
                content[BASE_DELTA] = base
                self.wire_bytes_down += base.count_bytes()
            out.append(
                Message(
                    content=content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[job.client_id]
                )
            )
        return out

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        """Send the jobs, collect the replies; clients without a valid reply get an error outcome."""
        started = time.perf_counter()
        replies = send_and_receive(
            self.grid, self.messages(round_, state, jobs), timeout=self.timeout, poll=self.poll
        )
        elapsed = time.perf_counter() - started
        client_of = {node: k for k, node in self.nodes.items()}
        wanted = {job.client_id for job in jobs}
        outcomes: dict[int, ClientOutcome] = {}
        for msg in replies:
            k = client_of.get(msg.metadata.src_node_id)
            if k is None or k not in wanted or k in outcomes:
                log.warning("ignoring a reply from node %d", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                outcomes[k] = ClientOutcome(k, error=f"raised on its node: {msg.error.reason}")
                continue
            try:
                result, wire = parse_reply(msg, k)
            except (KeyError, ValueError, TypeError) as exc:
                outcomes[k] = ClientOutcome(k, error=f"rejected: malformed reply ({exc})")
                continue
            # the deadline is enforced on the wire, so a reply that arrived is in time
            outcomes[k] = ClientOutcome(k, result, seconds=0.0, wire_bytes_up=wire)
            self._count_worker(msg)
        log.info(
            "round %d: %d of %d replies in %.1fs (%d client processes, %d model builds so far)",
            round_,
            len(outcomes),
            len(jobs),
            elapsed,
            self.worker_stats["client_processes"],
            self.worker_stats["model_builds"],
        )
        return list(outcomes.values())

    def _count_worker(self, msg: Message) -> None:
        """Note the reply's ClientApp process and its build count (replies without one: ignored)."""
        record = msg.content.config_records.get(WORKER)
        if record is None:
            return
        try:
            process = str(record["process"])
            builds = as_int(record["builds"], "builds")
        except (KeyError, ValueError):
            return
        self._builds[process] = max(builds, self._builds.get(process, 0))
        self.worker_stats["client_processes"] = len(self._builds)
        self.worker_stats["model_builds"] = sum(self._builds.values())


def parse_reply(msg: Message, client_id: int) -> tuple[ClientResult, int]:
    """A train reply -> (ClientResult, array bytes); raises on a malformed reply."""
    metrics = msg.content.metric_records[METRICS]
    record = msg.content.array_records[ADAPTER]
    claimed = as_int(metrics["client-id"], "client-id")
    if claimed != client_id:
        raise ValueError(f"reply claims client {claimed}")
    update = ClientUpdate(
        adapter=record_to_adapter(record),
        rank=as_int(metrics["rank"], "rank"),
        num_examples=as_int(metrics["num-examples"], "num-examples"),
        client_id=client_id,
    )
    stats = TrainStats(
        loss=as_float(metrics["train-loss"], "train-loss"),
        steps=as_int(metrics.get("steps", 0), "steps"),
        loss_per_level={},
        passes=as_int(metrics.get("passes", 0), "passes"),
        examples=as_int(metrics.get("examples", 0), "examples"),
    )
    return ClientResult(update, stats), record.count_bytes()
