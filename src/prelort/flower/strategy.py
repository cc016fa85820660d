"""A Message-API ``Strategy`` that sends each node its own rank prefix and aggregates with our rule.

Flower's stock strategies (FedAvg, server-side DP, SecAgg+) assume every client holds
arrays of the same shape; heterogeneous-rank LoRA breaks that. ``PrefixStrategy`` keeps the
framework-free ``ServerState`` of ``prelort.federation.core`` and per round

- ``configure_train``: samples the clients ``sample_clients(seed, round, K, m)`` exactly as
  the in-process simulator does and sends client k (the SuperNode whose ``partition-id`` is
  k) ``rule.downlink(global, r_k)``: the rank-r_k prefix (A[:r_k], B[:, :r_k]), FlexLoRA's
  rank-r_k SVD factors, and so on. FLoRA clients also get the accumulated merged base delta
  sum_t B_g^t A_g^t, because a fresh ClientApp process starts from the original base model.
- ``aggregate_train``: turns the replies into ``ClientUpdate``s, drops failed, late and
  invalid ones (``rejection_reason``, ``run.min_clients``) like the simulator's
  ``run_round``, and calls ``server_update`` on the rest in client-id order: the same
  function and aggregation registry as the simulator, so a Flower run and
  ``run_simulation`` with one config give the same global adapter.

Evaluation is central (``evaluate_per_rank`` on the SuperLink host), so
``configure_evaluate`` sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from prelort.adapters.state import Adapter, adapter_num_bytes
from prelort.aggregation.base import AggregationResult, ClientUpdate
from prelort.config import Config
from prelort.federation.core import (
    ServerState,
    assign_ranks,
    effective_ranks,
    initial_state,
    make_rule,
    sample_clients,
    server_update,
)
from prelort.federation.methods import get_method
from prelort.federation.validation import rejection_reason
from prelort.flower.records import (
    ADAPTER,
    BASE_DELTA,
    CONFIG,
    METRICS,
    adapter_to_record,
    as_float,
    as_int,
    record_to_adapter,
    tensors_to_record,
)
from prelort.flower.settings import config_to_json

log = logging.getLogger("flwr")


@dataclass
class RoundLog:
    """One round as the strategy saw it (the simulator's round record, plus wire bytes)."""

    clients: list[int] = field(default_factory=list)
    aggregated: list[int] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """``{"client": k, "reason": ...}`` for every sampled client left out, as the simulator."""
    skipped: bool = False
    """Fewer valid updates than ``run.min_clients``: the global adapter was kept."""
    bytes_down: int = 0
    """The method's download, counted as the simulator does (prefix + FLoRA's stack)."""
    bytes_up: int = 0
    wire_bytes_down: int = 0
    """Array bytes actually sent (FLoRA sends the dense accumulated delta, not the stack)."""
    wire_bytes_up: int = 0
    train_loss: float = float("nan")

    def record(self, server_round: int) -> dict[str, Any]:
        """The ``results.json`` round record (``seconds`` and ``per_rank`` added by the caller)."""
        return {
            "round": server_round,
            "seconds": 0.0,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "clients": self.clients,
            "aggregated": self.aggregated,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "train_loss": self.train_loss,
            "wire_bytes_up": self.wire_bytes_up,
            "wire_bytes_down": self.wire_bytes_down,
        }


class PrefixStrategy(Strategy):
    """Heterogeneous-rank federated LoRA over the Message API (see the module docstring).

    Parameters
    ----------
    cfg : Config
        The validated run config; ``clients.ranks`` holds the ranks the nodes reported.
    nodes : Mapping[int, int]
        Client id (the node's ``partition-id``) -> Flower node id.
    shapes : dict[str, tuple[int, int]]
        (out, in) of every target module, from the server's copy of the base model.
    state : ServerState, optional
        Resume from this state (a checkpoint) instead of ``initial_state``.
    """

    def __init__(
        self,
        cfg: Config,
        nodes: Mapping[int, int],
        shapes: dict[str, tuple[int, int]],
        state: ServerState | None = None,
    ) -> None:
        self.cfg = cfg
        self.method = get_method(cfg.run.method)
        self.rule = make_rule(cfg, self.method)
        self.capacities = effective_ranks(self.method, assign_ranks(cfg), cfg.clients.levels)
        self.state: ServerState = state if state is not None else initial_state(cfg, shapes)
        self.nodes = dict(nodes)
        self.last_result: AggregationResult | None = None
        self.round_log = RoundLog()
        self._sent: dict[int, Adapter] = {}
        self._config_json = config_to_json(cfg)

    # -- training -------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client with its own downlink.

        ``arrays`` (Flower's copy of the global model) is not used: the global adapter at
        rank R and every client's rank live in ``self.state``.
        """
        cl = self.cfg.clients
        sampled = sample_clients(
            self.cfg.run.seed, server_round, cl.num_clients, self.cfg.run.clients_per_round
        )
        self.round_log = RoundLog(clients=sampled)
        self.last_result = None
        self._sent = {}
        base = tensors_to_record(self.state.base_delta) if self.state.base_delta is not None else None
        messages = []
        for k in sampled:
            received = self.rule.downlink(self.state.adapter, self.state.client_ranks[k])
            self._sent[k] = received
            record = adapter_to_record(received)
            content = RecordDict(
                {
                    ADAPTER: record,
                    CONFIG: ConfigRecord(
                        {
                            **dict(config),
                            "server-round": server_round,
                            "client-id": k,
                            "prelort-config": self._config_json,
                        }
                    ),
                }
            )
            wire = record.count_bytes()
            if base is not None:
                content[BASE_DELTA] = base
                wire += base.count_bytes()
            self.round_log.bytes_down += adapter_num_bytes(received) + self.state.broadcast_bytes
            self.round_log.wire_bytes_down += wire
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[k])
            )
        log.info("configure_train: round %d, clients %s", server_round, sampled)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``server_update`` over the valid replies, in client-id order (as ``run_round``).

        A sampled client is dropped (``self.round_log.dropped``) if its node replied with an error,
        did not reply in time, or its update fails ``rejection_reason`` (wrong rank or shapes,
        NaN/Inf, norm above ``run.max_update_norm``). With fewer than ``run.min_clients``
        valid updates the round is skipped and the global adapter kept (returns None arrays).
        """
        client_of = {node: k for k, node in self.nodes.items()}
        found: dict[int, tuple[ClientUpdate, float]] = {}
        reasons: dict[int, str] = {}
        for msg in replies:
            k = client_of.get(msg.metadata.src_node_id)
            if k is None or k not in self._sent or k in found or k in reasons:
                log.warning("ignoring a reply from node %d", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                reasons[k] = f"raised on its node: {msg.error.reason}"
                continue
            try:
                update, loss, wire = _parse_reply(msg, k)
            except (KeyError, ValueError, TypeError) as exc:
                reasons[k] = f"rejected: malformed reply ({exc})"
                continue
            self.round_log.bytes_up += adapter_num_bytes(update.adapter)
            self.round_log.wire_bytes_up += wire
            reason = rejection_reason(
                update,
                sent=self._sent[k],
                capacity=self.capacities[k],
                max_norm=self.cfg.run.max_update_norm or None,
            )
            if reason is not None:
                reasons[k] = f"rejected: {reason}"
                continue
            found[k] = (update, loss)
        for k in self.round_log.clients:
            if k not in found and k not in reasons:
                reasons[k] = "timed out (no reply before the round's deadline)"
        self.round_log.dropped = [
            {"client": k, "reason": reasons[k]} for k in self.round_log.clients if k in reasons
        ]
        for d in self.round_log.dropped:
            log.warning("round %d: client %d dropped, %s", server_round, d["client"], d["reason"])
        updates = [found[k][0] for k in sorted(found)]
        self.round_log.aggregated = sorted(found)
        if found:
            self.round_log.train_loss = sum(loss for _, loss in found.values()) / len(found)
        if len(updates) < self.cfg.run.min_clients:
            self.round_log.skipped = True
            log.warning(
                "round %d: only %d valid update(s), fewer than run.min_clients = %d; global adapter kept",
                server_round,
                len(updates),
                self.cfg.run.min_clients,
            )
            self.state = replace(self.state, round=server_round)
            return None, None
        self.state, self.last_result = server_update(self.state, self.rule, updates)
        return adapter_to_record(self.state.adapter), MetricRecord({"train-loss": self.round_log.train_loss})

    # -- evaluation: central, per rank, on the server --------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing: the server evaluates the global adapter at every rank level itself."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        """Log the method, clients per round and each client's rank and node."""
        log.info("\t├──> PreLort method %r (rule %r)", self.method.name, self.method.rule)
        log.info(
            "\t├──> %d of %d clients per round", self.cfg.run.clients_per_round, self.cfg.clients.num_clients
        )
        for k, node in sorted(self.nodes.items()):
            log.info("\t│\t├── client %d: rank %d, node %d", k, self.state.client_ranks[k], node)
        log.info("\t└──> evaluation: central, per rank level %s", self.cfg.clients.levels)


def _parse_reply(msg: Message, client_id: int) -> tuple[ClientUpdate, float, int]:
    """A train reply -> (ClientUpdate, train loss, array bytes); raises on a malformed reply."""
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
    return update, as_float(metrics["train-loss"], "train-loss"), record.count_bytes()
