"""Nested LoRA adapters: state types, truncation and injection into torch models.

Names are imported lazily: ``prelort.adapters.state`` (tensors only) does not pull in PEFT.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_peft_adapter": "prelort.adapters.export",
    "NestedLoRA": "prelort.adapters.nested",
    "Adapter": "prelort.adapters.state",
    "LoRAPair": "prelort.adapters.state",
    "Scaling": "prelort.adapters.state",
    "adapter_num_bytes": "prelort.adapters.state",
    "init_adapter": "prelort.adapters.state",
    "load_adapter": "prelort.adapters.state",
    "save_adapter": "prelort.adapters.state",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prelort.adapters' has no attribute {name!r}")
