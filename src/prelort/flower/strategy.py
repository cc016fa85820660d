"""``HeteroRankLoRA``: a Flower strategy for LoRA clients of different ranks (issue #20).

A strategy of Flower's Message API (``flwr.serverapp.strategy``, a ``FedAvg`` subclass), for
any ``ServerApp`` with its own ``ClientApp``; it needs nothing else of PreLort's apps.

- The global state is an ``ArrayRecord`` of LoRA factors ``"<module>.A"`` (R x in) and
  ``"<module>.B"`` (out x R), as ``records.adapter_to_record`` writes them.
- Every node has a rank r_k, from ``ranks``: a mapping node id -> rank or a callable. A
  ServerApp fills it from its own knowledge or from a QUERY round (``query_ranks``: each
  ClientApp answers with the ``rank`` of its node config; a server cannot read node configs).
- ``configure_train`` sends node k the rule's downlink, for the segment-wise rules the
  rank-r_k prefix (A[:r_k], B[:, :r_k]) of the global adapter (docs/design.md §4.2), plus the
  train config; ``configure_evaluate`` sends each node the prefix it scores at its rank.
- ``aggregate_train`` reads each reply's one ``ArrayRecord`` (the trained prefix, its rank
  read from the factors' shapes) and ``num-examples`` from its ``MetricRecord``, and
  aggregates with a registered rule of ``prelort.aggregation`` (``segment``: segment-wise
  averaging, §4.2; ``prelort``: the same in importance order, §4.2b); metrics are FedAvg's
  ``num-examples``-weighted means (train loss among them, if the clients send one).

Rules whose clients need more than the adapter (a base-weight delta: ``flora``, ``florist``,
``fed-plora``) are refused: a Flower ClientApp of the user's would not know to apply it.
See docs/flower.md, "Using the strategy in your own ServerApp".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from prelort.adapters.state import Adapter, Scaling
from prelort.aggregation.base import (
    AggregationRule,
    ClientUpdate,
    MergingRule,
    Order,
    RuleOptions,
    RuleState,
    Split,
    get_rule,
)
from prelort.federation.methods import METHODS
from prelort.flower.records import adapter_to_record, as_int, record_to_adapter
from prelort.seeding import generator_for

RankSource = Mapping[int, int] | Callable[[int], int]
"""Where a node's rank comes from: node id -> rank, as a mapping or a function."""

RANK_KEY = "rank"
"""Node-config key (and QUERY-reply key) of a node's LoRA rank."""


def query_ranks(
    grid: Grid,
    node_ids: Iterable[int] | None = None,
    *,
    key: str = RANK_KEY,
    timeout: float = 60.0,
) -> dict[int, int]:
    """Ask nodes for their rank in one QUERY round: node id -> rank.

    Each node gets a QUERY message with ``ConfigRecord({"want": key})``; its ClientApp must
    answer with a ConfigRecord (any name) holding ``key``, usually ``context.node_config[key]``
    (``flower-supernode --node-config "rank=8"``). ``node_ids``: default every connected node.
    RuntimeError if a node fails or does not answer within ``timeout``.
    """
    nodes = sorted(grid.get_node_ids() if node_ids is None else node_ids)
    queries = [
        Message(
            RecordDict({"query": ConfigRecord({"want": key})}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    ranks: dict[int, int] = {}
    for msg in grid.send_and_receive(queries, timeout=timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise RuntimeError(f"node {node} failed the rank query: {msg.error.reason}")
        found = [rec[key] for rec in msg.content.config_records.values() if key in rec]
        if not found:
            raise RuntimeError(f"node {node} answered the rank query without {key!r}")
        ranks[node] = as_int(found[0], key)
    if missing := sorted(set(nodes) - set(ranks)):
        raise RuntimeError(f"nodes {missing} did not answer the rank query within {timeout:g} s")
    return ranks


class HeteroRankLoRA(FedAvg):
    """FedAvg's sampling and metrics; per-node rank-r downlinks and a PreLort aggregation rule.

    Parameters
    ----------
    ranks:
        Node id -> LoRA rank (a mapping or a callable), e.g. ``query_ranks(grid)``. A sampled
        node without a rank is an error; every rank must be at most the global rank R.
    rule:
        A registered rule name (``prelort.aggregation.RULES``; default ``segment``,
        docs/design.md §4.2) or a rule instance (its options used as they are).
    order, split:
        Rank-dimension order of the segment-wise rules (docs/design.md §4.2b); None: the
        method's own (``prelort``: ``round``, the importance order after every aggregation;
        ``segment``: ``ownership``, the literal segment-wise average).
    scaling, seed:
        The LoRA scale s(r) for rules that form products B A (None: s = 1), and a seed for
        rules that draw (per round, as ``prelort run`` does).
    **kwargs:
        ``FedAvg``'s: ``fraction_train``, ``min_train_nodes``, ``min_available_nodes``,
        ``fraction_evaluate``, ``weighted_by_key`` (default ``num-examples``),
        ``arrayrecord_key`` (default ``arrays``), ``configrecord_key`` (``config``), ...
    """

    def __init__(
        self,
        ranks: RankSource,
        rule: str | AggregationRule = "segment",
        *,
        order: Order | None = None,
        split: Split = "balanced",
        scaling: Scaling | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(rule, str):
            if order is None:
                order = METHODS[rule].order if rule in METHODS else "ownership"
            rule = get_rule(rule, RuleOptions(scaling=scaling, seed=seed, order=order, split=split))
        if isinstance(rule, MergingRule) or type(rule).fold is not AggregationRule.fold:
            raise ValueError(
                f"rule {rule.name!r} sends clients a base-weight delta besides the adapter; "
                "HeteroRankLoRA supports adapter-only rules (segment, prelort, hetlora, flexlora, ...)"
            )
        self.ranks = ranks
        self.rule = rule
        self.rule_state: RuleState | None = None
        """The rule's own server state (docs/design.md §6), created at the first round."""
        self._global: Adapter | None = None
        self._sent: dict[int, int] = {}

    def summary(self) -> None:
        """Log FedAvg's summary and the aggregation rule."""
        super().summary()
        log(INFO, "\t└──> Aggregation rule: %s (order %s)", self.rule.name, self.rule.options.order)

    def rank_of(self, node_id: int) -> int:
        """Node ``node_id``'s rank from ``ranks``; ValueError if unknown or not positive."""
        try:
            rank = self.ranks(node_id) if callable(self.ranks) else self.ranks[node_id]
        except KeyError:
            raise ValueError(f"no rank for node {node_id}; give HeteroRankLoRA(ranks=...) one") from None
        rank = as_int(rank, f"rank of node {node_id}")
        if rank <= 0:
            raise ValueError(f"node {node_id} has rank {rank}; ranks must be positive")
        return rank

    def _per_node(
        self, messages: Iterable[Message], adapter: Adapter, downlink: Callable[[int, int], Adapter]
    ) -> list[Message]:
        """FedAvg's messages (one per sampled node) with each node's own adapter instead."""
        out: list[Message] = []
        max_rank = min(p.rank for p in adapter.values())
        for msg in messages:
            node = msg.metadata.dst_node_id
            rank = self.rank_of(node)
            if rank > max_rank:
                raise ValueError(f"node {node} has rank {rank}, above the global adapter's rank {max_rank}")
            content = RecordDict(
                {
                    self.arrayrecord_key: adapter_to_record(downlink(node, rank)),
                    self.configrecord_key: msg.content.config_records[self.configrecord_key].copy(),
                }
            )
            out.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does; send node k the rule's rank-r_k downlink and the config.

        For the segment-wise rules that is the prefix (A[:r_k], B[:, :r_k]) of ``arrays``
        (docs/design.md §4.2); the global adapter is kept for ``aggregate_train``.
        """
        sampled = super().configure_train(server_round, arrays, config, grid)
        adapter = record_to_adapter(arrays)
        if self.rule_state is None:
            self.rule_state = self.rule.init_state(adapter)
        state = self.rule_state

        def downlink(node: int, rank: int) -> Adapter:
            msg = self.rule.message(adapter, state, rank, client_id=node, round_=server_round)
            if msg.base is not None:
                raise ValueError(f"rule {self.rule.name!r} needs a base-weight delta on the client")
            return msg.adapter

        messages = self._per_node(sampled, adapter, downlink)
        self._global = adapter
        self._sent = {m.metadata.dst_node_id: self.rank_of(m.metadata.dst_node_id) for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does; send node k the adapter scored at rank r_k (the rule's
        downlink without a client: the prefix, in importance order under ``order = "export"``)."""
        sampled = super().configure_evaluate(server_round, arrays, config, grid)
        adapter = record_to_adapter(arrays)
        return self._per_node(sampled, adapter, lambda node, rank: self.rule.downlink(adapter, rank))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the trained prefixes with the rule (docs/design.md §4.2 for ``segment``).

        Each valid reply holds one ArrayRecord (the node's trained factors, rank read from
        their shapes, at most the rank it was sent) and one MetricRecord with
        ``weighted_by_key`` (n_k). Updates go to the rule in node-id order. Returns the new
        global ArrayRecord and the weighted means of the reply metrics, or (None, None) when
        no reply is valid (the global adapter stays).
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None or self.rule_state is None:
            raise RuntimeError("aggregate_train before configure_train")
        updates: list[ClientUpdate] = []
        for msg in sorted(valid, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            if node not in self._sent:
                raise ValueError(f"reply from node {node}, which was not sent a train message this round")
            adapter = record_to_adapter(next(iter(msg.content.array_records.values())))
            ranks = {pair.rank for pair in adapter.values()}
            if len(ranks) != 1 or not 0 < (rank := ranks.pop()) <= self._sent[node]:
                raise ValueError(
                    f"node {node} returned factors of rank(s) {sorted({p.rank for p in adapter.values()})}, "
                    f"expected one rank up to {self._sent[node]}"
                )
            metrics = next(iter(msg.content.metric_records.values()))
            n = as_int(metrics[self.weighted_by_key], self.weighted_by_key)
            updates.append(ClientUpdate(adapter, rank, n, client_id=node))
        options = self.rule.options
        generator = generator_for(options.seed, "rule", server_round) if options.seed is not None else None
        rule = type(self.rule)(replace(options, generator=generator or options.generator, round=server_round))
        new, self.rule_state, _ = rule.update(self._global, self.rule_state, updates)
        self._global = None
        return adapter_to_record(new), self.train_metrics_aggr_fn(
            [m.content for m in valid], self.weighted_by_key
        )
