"""Nested LoRA adapters: state types, truncation and injection into torch models.

Names are imported lazily: ``prelort.adapters.state`` (tensors only) does not pull in PEFT.
"""

from __future__ import annotations

from prelort._lazy import lazy_getattr

_LAZY = {
    "export_peft_adapter": "prelort.adapters.export",
    "export_all_levels": "prelort.adapters.levels",
    "load_all_levels": "prelort.adapters.levels",
    "read_record": "prelort.adapters.levels",
    "truncate": "prelort.adapters.levels",
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

__getattr__ = lazy_getattr("prelort.adapters", _LAZY)
