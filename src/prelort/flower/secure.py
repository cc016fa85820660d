"""Secure aggregation over Flower: the sum form of the segment-wise rule under SecAgg+.

Flower's ``SecAggPlusWorkflow`` (legacy workflow API) computes the weighted average of
vectors of *one shape* from every sampled client, and the server learns only that average.
The sum form (docs/design.md §4.9) gives exactly such vectors: every client of every rank
sends its weighted change ``w_k D_k`` zero-padded to rank R (all modules) and its row
weights, flattened (``RowSums.to_arrays``). So a round under ``privacy.secure_aggregation``:

- **Server** (``SecureFlowerTransport.execute_sums``): builds each sampled client's TRAIN
  content as in a plain round (its downlink, the config, the base delta) plus ``sum-rows``
  (how many rank rows to send: the segments with at least ``privacy.min_segment_owners``
  sampled owners) and runs SecAgg+'s four stages (setup, share keys, collect masked
  vectors, unmask) with those contents in the collect stage, every client weight 1
  (``num_examples = 1``, ``max_weight = 1``, so SecAgg+ scales nothing) and the quantization
  of ``privacy.secagg_*``. Only the unmasked sum reaches the driver (``RoundSums``); the
  driver adds the DP noise (central DP) and divides row by row. Clients that dropped out
  before sending their masked vector are reported dropped; their masks are removed by
  SecAgg+ from the other clients' key shares as long as every client keeps at least
  ``threshold`` live neighbours, else the protocol halts and the round is skipped.
- **Client** (``secure_client``: ``secure_mod`` on the ClientApp, ``sum_reply``): a TRAIN
  message carrying SecAgg+'s config record goes through Flower's ``secaggplus_mod``; in its collect stage the
  ClientApp trains as usual and answers with its padded vector as a legacy ``FitRes``, which
  the mod quantizes, masks and sends. Plain TRAIN messages pass through untouched.

What the server cannot do under secure aggregation: validate an individual update (norm,
NaN, rank; only the vector's shape is fixed by the protocol) or see per-client train losses
and data sizes. What it still learns: every segment's sum over its owners (a segment with
one owner would be that owner's rows, hence ``min_segment_owners``), which clients survived,
and each client's pass count (data independent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from prelort.flower.records import CONFIG
from prelort.flower.secure_client import SUM_ROWS
from prelort.flower.transport import FlowerTransport, send_and_receive

if TYPE_CHECKING:
    from prelort.federation.core import ServerState
    from prelort.federation.plan import RunPlan
    from prelort.federation.transport import ClientJob, RoundSums, SumSpec

log = logging.getLogger("flwr")

MODULUS_BITS = 32
"""SecAgg+'s modulus 2^32 (its maximum): the sum of n quantized vectors must stay below it."""


# -- server side ----------------------------------------------------------------------------------
class _Proxy(ClientProxy):
    """A node id in the shape SecAgg+'s legacy strategy calls need (nothing is called on it)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins: Any, timeout: Any, group_id: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def get_parameters(self, ins: Any, timeout: Any, group_id: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins: Any, timeout: Any, group_id: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins: Any, timeout: Any, group_id: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins: Any, timeout: Any, group_id: Any) -> Any:  # pragma: no cover
        raise NotImplementedError


class _SumStrategy(Strategy):
    """The legacy strategy of one SecAgg+ round: picks the round's nodes, keeps the sum."""

    def __init__(self, nodes: Sequence[int]) -> None:
        self.nodes = list(nodes)
        self.average: list[np.ndarray] | None = None
        """SecAgg+'s output: the sum of the survivors' vectors divided by their number."""
        self.survivors: list[int] = []
        self.metrics: dict[int, dict[str, Any]] = {}

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:  # pragma: no cover
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        return [(_Proxy(n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        self.survivors = [proxy.node_id for proxy, _ in results]
        self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []  # pragma: no cover

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}  # pragma: no cover

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return None  # pragma: no cover


class _SumWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose collect stage sends PreLort's own TRAIN contents (downlink, config)."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        ok: bool = super().collect_masked_vectors_stage(grid, context, state)
        return ok


def _upload_bytes(msg: Message) -> int:
    """Bytes of a reply's arrays and of the bytes / strings in its config records."""
    if msg.has_error():
        return 0
    total = sum(rec.count_bytes() for rec in msg.content.array_records.values())
    for rec in msg.content.config_records.values():
        for value in rec.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, bytes | str))
    return total


class _PollingGrid:
    """The ``send_and_receive`` SecAgg+ calls, polling every ``poll`` seconds (Flower's own
    waits 3 s between pulls), counting the bytes clients upload."""

    def __init__(self, transport: FlowerTransport) -> None:
        self.transport = transport
        self.bytes_up = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        t = self.transport
        replies = send_and_receive(t.grid, messages, timeout=timeout or t.timeout, poll=t.poll)
        self.bytes_up += sum(_upload_bytes(m) for m in replies)
        for m in replies:  # the collect stage's replies carry the ClientApp's worker record
            if not m.has_error():
                t._count_worker(m)
        return replies


class SecureFlowerTransport(FlowerTransport):
    """``FlowerTransport`` whose rounds run SecAgg+ over the sum-form vectors (``execute_sums``)."""

    def __init__(
        self, grid: Grid, plan: RunPlan, nodes: dict[int, int], *, timeout: float, poll: float
    ) -> None:
        super().__init__(grid, plan.cfg, nodes, timeout=timeout, poll=poll)
        assert plan.privacy is not None and plan.privacy.secure
        self.privacy = plan.privacy
        self.last_survivors: list[int] = []

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> Any:
        raise RuntimeError("a secure-aggregation transport only sums (execute_sums)")

    def execute_sums(
        self, round_: int, state: ServerState, jobs: Sequence[ClientJob], spec: SumSpec
    ) -> RoundSums:
        """One SecAgg+ round over the jobs' clients; the sum of the survivors' vectors."""
        from prelort.aggregation.sumform import RowSums
        from prelort.federation.transport import RoundSums

        started = time.perf_counter()
        contents: dict[int, RecordDict] = {}
        client_of: dict[int, int] = {}
        for msg in self.messages(round_, state, jobs):
            node = msg.metadata.dst_node_id
            msg.content.config_records[CONFIG][SUM_ROWS] = spec.rows
            contents[node] = msg.content
        for k, node in self.nodes.items():
            client_of[node] = k
        strategy = _SumStrategy(list(contents))
        p = self.privacy
        workflow = _SumWorkflow(
            contents,
            num_shares=1.0,  # every sampled client shares its keys with every other one
            reconstruction_threshold=p.secagg_threshold,
            max_weight=1.0,
            clipping_range=p.secagg_clipping_range,
            quantization_range=2**p.secagg_bits,
            modulus_range=2**MODULUS_BITS,
            timeout=self.timeout,
        )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy
        )
        context.state.config_records["config"] = ConfigRecord({"current_round": round_})
        context.state.array_records["parameters"] = ArrayRecord()
        grid = _PollingGrid(self)
        workflow(cast(Grid, grid), context)
        sampled = [job.client_id for job in jobs]
        if strategy.average is None:  # SecAgg+ halted: too few clients answered a stage
            reason = "secure aggregation halted (fewer live clients than SecAgg+'s threshold)"
            log.warning("round %d: %s", round_, reason)
            return RoundSums(
                None, [], [{"client": k, "reason": reason} for k in sampled], wire_bytes_up=grid.bytes_up
            )
        survivors = sorted(client_of[n] for n in strategy.survivors)
        self.last_survivors = survivors
        n = len(survivors)
        arrays = [np.asarray(a, dtype=np.float64) * n for a in strategy.average]  # average -> sum
        shapes = {name: (int(g.B.shape[0]), int(g.A.shape[1])) for name, g in state.adapter.items()}
        sums = RowSums.from_arrays(arrays, shapes)
        dropped = [
            {"client": k, "reason": "dropped out of SecAgg+ before sending its masked vector"}
            for k in sampled
            if k not in survivors
        ]
        passes = sum(int(m.get("passes", 0)) for m in strategy.metrics.values())
        padded = 4 * (sum(spec.max_rank * (s[0] + s[1]) for s in shapes.values()) + spec.max_rank)
        log.info(
            "round %d: SecAgg+ summed %d of %d clients in %.1fs (%d bytes uploaded)",
            round_,
            n,
            len(sampled),
            time.perf_counter() - started,
            grid.bytes_up,
        )
        return RoundSums(
            sums,
            survivors,
            dropped,
            bytes_up=padded * n,
            passes=passes,
            examples=0,
            wire_bytes_up=grid.bytes_up,
        )
