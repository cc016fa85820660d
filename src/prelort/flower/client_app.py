"""The Flower ``ClientApp``: one client's round is ``client_update``, as in the simulator.

- ``query``: reports the node's ``partition-id`` (its client id) and ``rank`` from
  ``--node-config "partition-id=0 rank=8"``; the server cannot read a node's config itself.
- ``train``: rebuilds the validated ``Config`` the server sends, loads the received prefix
  into the workload's base model (with FLoRA's accumulated base delta merged in), runs
  ``client_update`` and returns the trained prefix with n_k, its rank and the train loss.
- ``evaluate``: the received adapter's metrics on the workload's test split at its rank.
  PreLort's strategy evaluates centrally per rank and never sends evaluate messages; this
  handler exists for other strategies and manual checks.

A SuperNode starts a fresh ClientApp process per message, so the base model is loaded per
message: LLMs load from the safetensors cache of ``prelort.models.load_causal_lm`` (< 1 s),
never from GGUF. Where a process serves several messages (a Ray actor of Flower's simulation
engine) the built workload and base model are kept in ``_WORKERS`` and reused. Every train
reply carries a ``worker`` record (the process, ``host:pid``, and how many workloads it has
built so far), so the server can tell how often models were built.

Imports follow the workload: this module imports only Flower (no torch); a train message
imports torch, PEFT (which itself imports transformers) and the workload's own modules;
the synthetic workload loads no pretrained model and reads no data set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prelort.flower.settings import config_from_json, node_info_from_config

if TYPE_CHECKING:
    import torch

    from prelort.adapters.nested import NestedLoRA
    from prelort.adapters.state import Adapter
    from prelort.config import Config
    from prelort.federation.workload import Workload

app = ClientApp()


@dataclass
class _Worker:
    """A built workload and its nested-LoRA base model, reusable across messages."""

    workload: Workload
    nested: NestedLoRA
    merged: frozenset[str] = frozenset()
    """Modules whose base weights carry a merged delta (FLoRA)."""

    def sync_base(self, delta: dict[str, torch.Tensor] | None) -> None:
        """Base weights W = W0 + ``delta`` (W0 where ``delta`` is None or lacks a module)."""
        import torch

        target = dict(delta or {})
        for name in self.merged - set(target):  # left over from an earlier run in this process
            A, B = self.nested.factor(name)
            target[name] = torch.zeros(B.shape[0], A.shape[1])
        if target:
            self.nested.set_base_delta(target)
        self.merged = frozenset(delta or {})


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


def _setup(msg: Message, context: Context) -> tuple[Config, int, int, _Worker, Adapter]:
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

    conf = msg.content.config_records[CONFIG]
    cfg = config_from_json(as_str(conf["prelort-config"], "prelort-config"))
    client_id = as_int(conf["client-id"], "client-id")
    server_round = as_int(conf["server-round"], "server-round")
    if "partition-id" in context.node_config:
        own = node_info_from_config(context.node_config).partition_id
        if own != client_id:
            raise ValueError(f"the server sent client {client_id}'s work to the node of partition {own}")
    worker = _worker(cfg)
    arrays = msg.content.array_records
    worker.sync_base(record_to_tensors(arrays[BASE_DELTA]) if BASE_DELTA in arrays else None)
    return cfg, client_id, server_round, worker, record_to_adapter(arrays[ADAPTER])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report partition id and rank (0: none given, the run's config decides)."""
    info = node_info_from_config(context.node_config)
    record = ConfigRecord({"partition-id": info.partition_id, "rank": info.rank or 0})
    return Message(RecordDict({"node": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """``client_update`` on the received prefix; reply with the trained prefix and n_k."""
    from prelort.federation.core import client_update
    from prelort.federation.plan import build_plan
    from prelort.flower.records import ADAPTER, METRICS, WORKER, adapter_to_record

    cfg, client_id, server_round, worker, received = _setup(msg, context)
    plan = build_plan(cfg)
    res = client_update(
        worker.nested, received, client_id=client_id, round_=server_round, plan=plan, workload=worker.workload
    )
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
    content = RecordDict(
        {ADAPTER: adapter_to_record(res.update.adapter), METRICS: metrics, WORKER: _worker_record()}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the received adapter at its own rank on the workload's test split."""
    import torch

    from prelort.flower.records import METRICS

    _, client_id, _, worker, received = _setup(msg, context)
    rank = next(iter(received.values())).rank
    worker.nested.set_adapter(received)
    worker.nested.set_rank(rank)
    with torch.no_grad():
        metrics: dict[str, float] = worker.workload.evaluate(worker.nested.model)
    record = MetricRecord({**metrics, "client-id": client_id, "rank": rank})
    return Message(RecordDict({METRICS: record}), reply_to=msg)
