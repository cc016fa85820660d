"""The Flower ``ClientApp``: one client's round is ``client_update``, as in the simulator.

- ``query``: reports the node's ``partition-id`` (its client id) and ``rank`` from
  ``--node-config "partition-id=0 rank=8"``; the server cannot read a node's config itself.
- ``train``: rebuilds the validated ``Config`` the server sends, loads the received prefix
  into the workload's base model (with FLoRA's accumulated base delta merged in), runs
  ``client_update`` and returns the trained prefix with n_k, its rank and the train loss.
- ``evaluate``: the received adapter's metrics on the workload's test split at its rank.
  PreLort's strategy evaluates centrally per rank and never sends evaluate messages; this
  handler exists for other strategies and manual checks.

Both compute ``handle(op, content, node_config)``, the reply's content, either here or in
the node's **warm worker** (``prelort.flower.worker``): with ``worker = "unix:/path.sock"``
in the node config (``--node-config "partition-id=0 rank=8 worker='unix:/tmp/w0.sock'"``)
the handlers send the message content to that long-lived process, which runs the same
``handle`` on a workload and base model it keeps across messages, and return its reply; an
error there (or an unreachable worker) raises here, so Flower sends an error reply and the
server drops the client with the reason. Without ``worker`` the work runs in this process.
The sending is ``call`` of ``prelort.flower.worker_protocol``: this module never imports
``prelort.flower.worker`` (which imports ``handle`` from here), so they form no import cycle.

A SuperNode starts a fresh ClientApp process per message, so without a worker the base
model is loaded per message: LLMs load from the safetensors cache of
``prelort.models.load_causal_lm`` (< 1 s), never from GGUF. Where a process serves several
messages (a warm worker, a Ray actor of Flower's simulation engine) the built workload and
base model are kept in ``_WORKERS`` and reused. Every train reply carries a ``worker``
record (the process that computed it, ``host:pid``, and how many workloads it has built so
far), so the server can tell how often models were built.

Imports follow the workload: this module imports only Flower (no torch), and so does a
message handed to a worker; a message computed here imports torch, PEFT (which itself
imports transformers) and the workload's own modules; the synthetic workload loads no
pretrained model and reads no data set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prelort.errors import ConfigError
from prelort.flower.secure_client import is_secure, secure_mod, sum_reply
from prelort.flower.settings import config_from_json, node_info_from_config
from prelort.flower.worker_protocol import call

if TYPE_CHECKING:
    import torch

    from prelort.adapters.nested import NestedLoRA
    from prelort.adapters.state import Adapter
    from prelort.config import Config
    from prelort.federation.workload import Workload

app = ClientApp(mods=[secure_mod])
"""``secure_mod``: SecAgg+ rounds of ``privacy.secure_aggregation`` (``prelort.flower.secure``)."""

WORKER_KEY = "worker"
"""Node-config key naming the node's warm worker (``unix:/path.sock`` or ``host:port``)."""

NodeConfig = Mapping[str, bool | int | float | str]


@dataclass
class _Worker:
    """A built workload and its nested-LoRA base model, reusable across messages."""

    workload: Workload
    nested: NestedLoRA

    def sync_base(self, delta: dict[str, torch.Tensor] | None) -> None:
        """Base weights W = W0 + ``delta`` (W0 where ``delta`` is None or lacks a module)."""
        self.nested.set_base(delta)


_WORKERS: dict[str, _Worker] = {}
_BUILDS = 0
"""Workloads (base model included) built in this process so far."""

log = logging.getLogger("flwr")


def _worker(cfg: Config) -> _Worker:
    """The cached worker for this config's workload and adapter layout (built once per process)."""
    global _BUILDS
    from prelort.config import config_to_dict
    from prelort.federation.simulator import build_nested
    from prelort.workloads import build_workload

    data = config_to_dict(cfg)
    data.pop("run")  # method, seed and rounds do not change the workload or the model
    data.pop("privacy", None)  # neither does [privacy]
    key = json.dumps(data, sort_keys=True)
    if key not in _WORKERS:
        _WORKERS.clear()  # one model in memory at a time
        workload = build_workload(cfg)
        _WORKERS[key] = _Worker(workload, build_nested(cfg, workload))
        _BUILDS += 1
        log.debug("prelort: built the %s workload in process %d", cfg.workload.kind, os.getpid())
    return _WORKERS[key]


def _worker_record() -> ConfigRecord:
    """This process (``host:pid``) and the workloads built in it so far."""
    return ConfigRecord({"process": f"{socket.gethostname()}:{os.getpid()}", "builds": _BUILDS})


def _setup(content: RecordDict, node_config: NodeConfig) -> tuple[Config, int, int, _Worker, Adapter]:
    """Config, client id, round, worker (base synced) and received adapter of a message."""
    from prelort.flower.records import (
        ADAPTER,
        BASE_DELTA,
        CONFIG,
        as_int,
        as_str,
        record_to_adapter,
        record_to_tensors,
    )

    conf = content.config_records[CONFIG]
    cfg = config_from_json(as_str(conf["prelort-config"], "prelort-config"))
    client_id = as_int(conf["client-id"], "client-id")
    server_round = as_int(conf["server-round"], "server-round")
    if "partition-id" in node_config:
        own = node_info_from_config(node_config).partition_id
        if own != client_id:
            raise ValueError(f"the server sent client {client_id}'s work to the node of partition {own}")
    worker = _worker(cfg)
    arrays = content.array_records
    worker.sync_base(record_to_tensors(arrays[BASE_DELTA]) if BASE_DELTA in arrays else None)
    return cfg, client_id, server_round, worker, record_to_adapter(arrays[ADAPTER])


def _train(content: RecordDict, node_config: NodeConfig) -> RecordDict:
    """``client_update`` on the received prefix: the trained prefix, n_k and the train loss."""
    from prelort.federation.core import client_update
    from prelort.federation.plan import build_plan
    from prelort.flower.records import ADAPTER, METRICS, WORKER, adapter_to_record

    cfg, client_id, server_round, worker, received = _setup(content, node_config)
    plan = build_plan(cfg)
    res = client_update(
        worker.nested, received, client_id=client_id, round_=server_round, plan=plan, workload=worker.workload
    )
    if is_secure(content):  # a SecAgg+ collect stage: the padded sum-form vector, masked by secure_mod
        reply = sum_reply(content, plan, client_id, received, res)
        reply[WORKER] = _worker_record()
        return reply
    metrics = MetricRecord(
        {
            "client-id": client_id,
            "rank": res.update.rank,
            "num-examples": res.update.num_examples,
            "train-loss": float(res.stats.loss),
            "steps": res.stats.steps,
            "passes": res.stats.passes,
            "examples": res.stats.examples,
        }
    )
    return RecordDict(
        {ADAPTER: adapter_to_record(res.update.adapter), METRICS: metrics, WORKER: _worker_record()}
    )


def _evaluate(content: RecordDict, node_config: NodeConfig) -> RecordDict:
    """Metrics of the received adapter at its own rank on the workload's test split."""
    import torch

    from prelort.flower.records import METRICS

    _, client_id, _, worker, received = _setup(content, node_config)
    rank = next(iter(received.values())).rank
    worker.nested.set_adapter(received)
    worker.nested.set_rank(rank)
    with torch.no_grad():
        metrics: dict[str, float] = worker.workload.evaluate(worker.nested.model)
    return RecordDict({METRICS: MetricRecord({**metrics, "client-id": client_id, "rank": rank})})


HANDLERS = {"train": _train, "evaluate": _evaluate}
"""The work of a message type, computed in this process: ``handle`` dispatches here."""


def handle(op: str, content: RecordDict, node_config: NodeConfig) -> RecordDict:
    """The reply content of a ``train`` or ``evaluate`` message, computed in this process.

    The one implementation of a client's work: the ClientApp calls it without a worker, the
    warm worker (``prelort.flower.worker``) for every request it serves.
    """
    if op not in HANDLERS:
        raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(HANDLERS)}")
    return HANDLERS[op](content, node_config)


def _reply(op: str, msg: Message, context: Context) -> Message:
    """``handle`` here, or in the node's worker when its node config names one."""
    address = context.node_config.get(WORKER_KEY)
    if address is None:
        content = handle(op, msg.content, context.node_config)
    else:
        if not isinstance(address, str) or not address:
            raise ConfigError(
                f"node config: {WORKER_KEY} must be an address like 'unix:/path/worker.sock', got {address!r}"
            )
        content = call(address, op, msg.content, context.node_config)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report partition id and rank (0: none given, the run's config decides)."""
    info = node_info_from_config(context.node_config)
    record = ConfigRecord({"partition-id": info.partition_id, "rank": info.rank or 0})
    return Message(RecordDict({"node": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """``client_update`` on the received prefix; reply with the trained prefix and n_k."""
    return _reply("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the received adapter at its own rank on the workload's test split."""
    return _reply("evaluate", msg, context)
