"""Nested LoRA adapters: state types, truncation and injection into torch models."""

from prelort.adapters.export import export_peft_adapter
from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import (
    Adapter,
    LoRAPair,
    Scaling,
    adapter_num_bytes,
    clone_adapter,
    init_adapter,
    load_adapter,
    save_adapter,
    truncate_adapter,
)

__all__ = [
    "Adapter",
    "LoRAPair",
    "NestedLoRA",
    "Scaling",
    "adapter_num_bytes",
    "clone_adapter",
    "export_peft_adapter",
    "init_adapter",
    "load_adapter",
    "save_adapter",
    "truncate_adapter",
]
