"""Adapters and weight deltas as Flower ``ArrayRecord``s (fp32; ArrayRecord refuses bf16).

An adapter travels as one ArrayRecord with two arrays per target module,
``"<module>.A"`` (r, in) and ``"<module>.B"`` (out, r), so a rank-r client's message holds
exactly its prefix. Conversions copy; the round trip is exact for fp32 tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from prelort.adapters.state import Adapter, LoRAPair

# Keys of the records in a train message and its reply.
ADAPTER = "adapter"
"""ArrayRecord: the downlink (server -> client) or the trained prefix (reply)."""
BASE_DELTA = "base-delta"
"""ArrayRecord: FLoRA's accumulated merged base-weight deltas (only when there are some)."""
CONFIG = "config"
"""ConfigRecord: server-round, client-id and the resolved config as JSON (prelort-config)."""
METRICS = "metrics"
"""MetricRecord of a reply: client-id, rank, num-examples, train-loss."""
WORKER = "worker"
"""ConfigRecord of a train reply: the ClientApp's process (``host:pid``) and ``builds``, the
workloads (base model included) built in that process so far."""


def as_int(value: object, key: str) -> int:
    """``value`` (a record entry) as an int; ValueError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def as_float(value: object, key: str) -> float:
    """``value`` (a record entry) as a float; ValueError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def as_str(value: object, key: str) -> str:
    """``value`` (a record entry) as a str; ValueError naming ``key`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _array(t: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()))


def _tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(np.array(a.numpy(), dtype=np.float32, copy=True))


def adapter_to_record(adapter: Adapter) -> ArrayRecord:
    """``{module: LoRAPair(A, B)}`` -> ArrayRecord ``{"module.A": A, "module.B": B}`` (fp32)."""
    record = ArrayRecord()
    for name, pair in adapter.items():
        record[f"{name}.A"] = _array(pair.A)
        record[f"{name}.B"] = _array(pair.B)
    return record


def record_to_adapter(record: ArrayRecord) -> Adapter:
    """Inverse of ``adapter_to_record``; ValueError if a factor is missing or malformed."""
    names = sorted({key.rsplit(".", 1)[0] for key in record})
    adapter: Adapter = {}
    for name in names:
        try:
            adapter[name] = LoRAPair(_tensor(record[f"{name}.A"]), _tensor(record[f"{name}.B"]))
        except KeyError as exc:
            raise ValueError(f"adapter record misses array {exc}") from None
    if not adapter:
        raise ValueError("adapter record is empty")
    return adapter


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors (e.g. FLoRA's merged base-weight deltas) -> fp32 ArrayRecord."""
    record = ArrayRecord()
    for name, t in tensors.items():
        record[name] = _array(t)
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of ``tensors_to_record``."""
    return {name: _tensor(record[name]) for name in record}
