"""The global model a run leaves behind: ``global_adapter.safetensors`` (+ FLoRA's base delta)."""

from __future__ import annotations

from pathlib import Path

import torch

from prelort.adapters.state import Adapter, LoRAPair, load_adapter, save_adapter
from prelort.federation.core import ServerState

ADAPTER_FILE = "global_adapter.safetensors"
BASE_DELTA_FILE = "base_delta.safetensors"


def save_global(out_dir: str | Path, state: ServerState) -> None:
    """Write the global adapter at rank R and, if any, the merged base-weight deltas."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(state.adapter, out / ADAPTER_FILE, metadata={"round": str(state.round)})
    if state.base_delta is not None:
        # stored as a rank-less "adapter" with B = delta, A = I would be wasteful: plain tensors
        from safetensors.torch import save_file

        tmp = out / f".{BASE_DELTA_FILE}.tmp"
        save_file({k: v.contiguous().float() for k, v in state.base_delta.items()}, str(tmp))
        tmp.replace(out / BASE_DELTA_FILE)


def load_global(run_dir: str | Path) -> tuple[Adapter, dict[str, torch.Tensor] | None]:
    """Read what ``save_global`` wrote; ValueError with a clear message if it is missing."""
    run = Path(run_dir)
    path = run / ADAPTER_FILE
    if not path.is_file():
        raise ValueError(f"{run}: no {ADAPTER_FILE}; pass the --out folder of a finished `prelort run`")
    adapter = load_adapter(path)
    delta = None
    if (run / BASE_DELTA_FILE).is_file():
        from safetensors.torch import load_file

        delta = load_file(str(run / BASE_DELTA_FILE))
    return adapter, delta


__all__ = ["ADAPTER_FILE", "BASE_DELTA_FILE", "LoRAPair", "load_global", "save_global"]
