"""The global model a run leaves behind: ``global_adapter.safetensors`` (+ FLoRA's base delta).

Both files carry a SHA-256 of their tensors (keys, dtypes, shapes, bytes) in the safetensors
metadata (``prelort = "round=N;sha256=..."``), are written atomically
(``reporting.files.atomic_write_bytes``) and are checked on every load, so ``prelort export`` /
``eval`` refuse a damaged file instead of using its bytes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.atomic_files import atomic_write_bytes
from prelort.federation.core import ServerState

ADAPTER_FILE = "global_adapter.safetensors"
BASE_DELTA_FILE = "base_delta.safetensors"
_LEGACY_METADATA = {"round"}
"""Files written before checksums had only this metadata; they are read unverified."""
_META_KEY = "prelort"
_META = re.compile(r"round=-?\d+;sha256=([0-9a-f]{64})")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: keys, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor], round_: int) -> None:
    from safetensors.torch import save as safetensors_bytes

    # one metadata entry: safetensors orders several at random, and the bytes should not vary
    meta = {_META_KEY: f"round={round_};sha256={tensors_sha256(tensors)}"}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking their checksum; ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: damaged file ({type(exc).__name__}: {exc}); run the training again"
        ) from None
    if set(metadata) == _LEGACY_METADATA:
        return tensors
    m = _META.fullmatch(metadata.get(_META_KEY, "")) if set(metadata) == {_META_KEY} else None
    if m is None:
        raise ValueError(
            f"{path}: damaged file (no prelort checksum in its metadata); run the training again"
        )
    if m.group(1) != tensors_sha256(tensors):
        raise ValueError(
            f"{path}: damaged file (its tensors do not match their checksum); run the training again"
        )
    return tensors


def save_global(
    out_dir: str | Path, state: ServerState, merged: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the global adapter at rank R and, if any, the weight deltas merged into the base
    (``AggregationRule.merged`` of the state: FLoRA, FLoRIST)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, pair in state.adapter.items():
        tensors[f"{name}.A"] = pair.A.detach().contiguous().float()
        tensors[f"{name}.B"] = pair.B.detach().contiguous().float()
    _write(out / ADAPTER_FILE, tensors, state.round)
    if merged is not None:
        delta = {k: v.detach().contiguous().float() for k, v in merged.items()}
        _write(out / BASE_DELTA_FILE, delta, state.round)


def load_global(run_dir: str | Path) -> tuple[Adapter, dict[str, torch.Tensor] | None]:
    """Read and verify what ``save_global`` wrote; ValueError with a clear message otherwise."""
    run = Path(run_dir)
    path = run / ADAPTER_FILE
    if not path.is_file():
        raise ValueError(f"{run}: no {ADAPTER_FILE}; pass the --out folder of a finished `prelort run`")
    tensors = _read(path)
    names = {k.rsplit(".", 1)[0] for k in tensors}
    try:
        adapter = {n: LoRAPair(tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in sorted(names)}
    except KeyError as exc:
        raise ValueError(f"{path}: adapter file misses tensor {exc}; run the training again") from None
    except ValueError as exc:  # factors of different ranks or dimensions
        raise ValueError(f"{path}: {exc}; run the training again") from None
    if not adapter:
        raise ValueError(f"{path}: adapter file holds no tensors; run the training again")
    delta = None
    if (run / BASE_DELTA_FILE).is_file():
        delta = _read(run / BASE_DELTA_FILE)
    return adapter, delta


__all__ = ["ADAPTER_FILE", "BASE_DELTA_FILE", "LoRAPair", "load_global", "save_global", "tensors_sha256"]
