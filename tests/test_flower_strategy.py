"""``HeteroRankLoRA`` in a user's own Flower apps (issue #20 item 2).

The ``ServerApp`` and ``ClientApp`` below use only Flower's API (and numpy), plus the
project's strategy: the example of docs/flower.md, "Using the strategy in your own ServerApp".
They run over an in-memory ``Grid`` that hands every message straight to the ClientApp (no
processes); three nodes of ranks 2, 4, 8, a global adapter of rank 10 (rows 8 and 9 owned by
nobody), two rounds, and the final global adapter is checked against the segment-wise rule
(docs/design.md §4.2) computed here with explicit loops.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from prelort.adapters.state import LoRAPair
from prelort.aggregation.importance import importance_order
from prelort.flower.strategy import HeteroRankLoRA, query_ranks

MODULES = {"layers.0.q": (5, 3), "layers.1.v": (4, 6)}  # name -> (in, out)
GLOBAL_RANK = 10
NODES = {33: {"rank": 4, "index": 1}, 11: {"rank": 8, "index": 2}, 22: {"rank": 2, "index": 0}}
NUM_EXAMPLES = {0: 30, 1: 10, 2: 20}  # node index -> n_k
ROUNDS = 2

# ---------------------------------------------------------------- the user's ClientApp (Flower only)
client = ClientApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    """Answer ``query_ranks``: the rank from this node's config."""
    return Message(RecordDict({"node": ConfigRecord({"rank": context.node_config["rank"]})}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    """'Training': every received entry + (node index + 1) / 10, at the received rank."""
    step = (int(context.node_config["index"]) + 1) / 10
    received = msg.content["arrays"]
    trained = ArrayRecord({key: Array(received[key].numpy() + step) for key in received})
    n = NUM_EXAMPLES[int(context.node_config["index"])]
    metrics = MetricRecord({"num-examples": n, "train-loss": step})
    return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report the rank of the received adapter (rows of A)."""
    rank = next(iter(msg.content["arrays"].values())).shape[0]
    n = NUM_EXAMPLES[int(context.node_config["index"])]
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "rank": rank})}), reply_to=msg)


# ---------------------------------------------------------------- the user's ServerApp (Flower + strategy)
server = ServerApp()


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    arrays: dict[str, Array] = {}
    for name, (d_in, d_out) in MODULES.items():
        arrays[f"{name}.A"] = Array(rng.standard_normal((GLOBAL_RANK, d_in)).astype(np.float32))
        arrays[f"{name}.B"] = Array(rng.standard_normal((d_out, GLOBAL_RANK)).astype(np.float32))
    return ArrayRecord(arrays)


@server.main()
def main(grid: Grid, context: Context) -> None:
    ranks = query_ranks(grid)  # node id -> rank, from each node's config
    strategy = HeteroRankLoRA(
        ranks, rule=str(context.run_config["rule"]), min_train_nodes=3, min_evaluate_nodes=3
    )
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=ROUNDS)
    context.state["global"] = result.arrays
    context.state["train"] = result.train_metrics_clientapp[ROUNDS]
    context.state["evaluate"] = result.evaluate_metrics_clientapp[ROUNDS]


# ---------------------------------------------------------------- an in-memory Grid
class InMemoryGrid(Grid):
    """Delivers each message at once to ``app``, as node ``dst_node_id`` with its node config."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict[str, Any]]) -> None:
        self.app = app
        self.node_configs = node_configs
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            ctx = Context(
                run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={}
            )
            self.sent.append(msg)
            self.replies[msg.metadata.message_id] = self.app(msg, ctx)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        raise NotImplementedError


# ---------------------------------------------------------------- the rule, by explicit loops
def segment_round(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One round of the ClientApp above and segment-wise averaging: row i of A / column i of
    B is the n_k-weighted mean over the nodes with rank > i; rows nobody owns keep their value."""
    new = {key: value.astype(np.float64).copy() for key, value in g.items()}
    for name in MODULES:
        for i in range(GLOBAL_RANK):
            owners = [c for c in NODES.values() if c["rank"] > i]
            if not owners:
                continue
            total = sum(NUM_EXAMPLES[c["index"]] for c in owners)
            row_a = sum(
                NUM_EXAMPLES[c["index"]] * (g[f"{name}.A"][i, :] + (c["index"] + 1) / 10) for c in owners
            )
            col_b = sum(
                NUM_EXAMPLES[c["index"]] * (g[f"{name}.B"][:, i] + (c["index"] + 1) / 10) for c in owners
            )
            new[f"{name}.A"][i, :] = row_a / total
            new[f"{name}.B"][:, i] = col_b / total
    return {key: value.astype(np.float32) for key, value in new.items()}


def in_importance_order(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``prelort``'s default order: the segment-wise average, then importance order (§4.2b)."""
    adapter = {
        name: LoRAPair(torch.from_numpy(g[f"{name}.A"]), torch.from_numpy(g[f"{name}.B"])) for name in MODULES
    }
    out: dict[str, np.ndarray] = {}
    for name, pair in importance_order(adapter).items():
        out[f"{name}.A"], out[f"{name}.B"] = pair.A.numpy(), pair.B.numpy()
    return out


@pytest.mark.parametrize("rule", ["segment", "prelort"])
def test_a_user_serverapp_aggregates_three_ranks_segment_wise(rule: str, task_identity: None) -> None:
    grid = InMemoryGrid(client, {node: dict(cfg) for node, cfg in NODES.items()})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"rule": rule})
    server(grid, context)

    expected = {key: array.numpy() for key, array in initial_arrays().items()}
    for _ in range(ROUNDS):
        expected = segment_round(expected)
        if rule == "prelort":
            expected = in_importance_order(expected)
    final = context.state["global"]
    assert isinstance(final, ArrayRecord) and set(final) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(final[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
    if rule == "segment":  # rows 8 and 9: no node owns them, they keep their initial value
        for name in MODULES:
            start = initial_arrays()
            np.testing.assert_array_equal(final[f"{name}.A"].numpy()[8:], start[f"{name}.A"].numpy()[8:])
            np.testing.assert_array_equal(
                final[f"{name}.B"].numpy()[:, 8:], start[f"{name}.B"].numpy()[:, 8:]
            )

    # every node received exactly its rank's factors, for training and for evaluation
    by_type: dict[str, list[int]] = {}
    for msg in grid.sent:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        by_type.setdefault(kind, []).append(node)
        if kind == "query":
            continue
        r = NODES[node]["rank"]
        arrays = msg.content["arrays"]
        assert set(arrays) == set(expected)
        for name, (d_in, d_out) in MODULES.items():
            assert arrays[f"{name}.A"].shape == (r, d_in) and arrays[f"{name}.B"].shape == (d_out, r)
    assert {k: sorted(v) for k, v in by_type.items()} == {
        "query": sorted(NODES),
        "train": sorted(list(NODES) * ROUNDS),
        "evaluate": sorted(list(NODES) * ROUNDS),
    }

    # FedAvg's metrics: num-examples-weighted means
    total = sum(NUM_EXAMPLES.values())
    loss = sum(n * (k + 1) / 10 for k, n in NUM_EXAMPLES.items()) / total
    assert context.state["train"]["train-loss"] == pytest.approx(loss)
    ranks = sum(NUM_EXAMPLES[c["index"]] * c["rank"] for c in NODES.values()) / total
    assert context.state["evaluate"]["rank"] == pytest.approx(ranks)


def test_ranks_can_be_a_function_and_bad_input_is_refused(task_identity: None) -> None:
    grid = InMemoryGrid(client, {node: dict(cfg) for node, cfg in NODES.items()})
    strategy = HeteroRankLoRA(lambda node: int(NODES[node]["rank"]), min_train_nodes=3, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=1)
    expected = segment_round({key: array.numpy() for key, array in initial_arrays().items()})
    for key, value in expected.items():
        np.testing.assert_allclose(result.arrays[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)

    with pytest.raises(ValueError, match="no rank for node"):
        HeteroRankLoRA({11: 8}, min_train_nodes=3).configure_train(1, initial_arrays(), ConfigRecord(), grid)
    with pytest.raises(ValueError, match="above the global adapter's rank"):
        HeteroRankLoRA({n: 12 for n in NODES}, min_train_nodes=3).configure_train(
            1, initial_arrays(), ConfigRecord(), grid
        )
    with pytest.raises(ValueError, match="base-weight delta"):
        HeteroRankLoRA({n: 2 for n in NODES}, rule="flora")
