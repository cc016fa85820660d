"""PreLort: federated heterogeneous-rank LoRA with prefix-nested adapters.

The first r rank dimensions of the global adapter are a good rank-r adapter for every r:
segment-wise aggregation averages each rank segment over the clients that own it, and
prefix-nested local training concentrates signal in the low-rank prefix.

The names below are imported lazily, so ``import prelort.<submodule>`` does not pull in
PEFT and transformers (Flower starts a fresh process per message).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

_LAZY = {
    "Adapter": "prelort.adapters",
    "LoRAPair": "prelort.adapters",
    "NestedLoRA": "prelort.adapters",
    "Scaling": "prelort.adapters",
    "AggregationResult": "prelort.aggregation",
    "ClientUpdate": "prelort.aggregation",
    "aggregate": "prelort.aggregation",
    "Config": "prelort.config",
    "load_config": "prelort.config",
    "run": "prelort.api",
    "compare": "prelort.api",
}
__all__ = sorted(_LAZY)


def _version() -> str:
    """The version of the installed distribution: its one source is ``pyproject.toml``."""
    try:
        return importlib.metadata.version("prelort")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prelort' has no attribute {name!r}")
