"""Atomic per-round checkpoints of the server state and the results so far.

Layout in the run directory::

    checkpoints/round-000012/state.safetensors   adapter A/B (+ FLoRA base deltas)
    checkpoints/round-000012/state.json          round, client ranks, results so far,
                                                 config fingerprint, tensor checksum
    checkpoints/LATEST                           name of the newest complete checkpoint

A checkpoint folder is written under a temporary name, every file fsynced, then renamed;
LATEST is replaced atomically last. The two newest checkpoints are kept, so a damaged newest
one (a truncated file) falls back to the previous one. Client randomness is derived from
(seed, round, client) and the rule's from (seed, round), so no RNG state needs saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from prelort.adapters.state import LoRAPair
from prelort.config import Config, config_to_dict, dump_toml
from prelort.errors import UserError
from prelort.federation.core import ServerState

CHECKPOINT_DIR = "checkpoints"
KEEP = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, or from another configuration."""


def config_fingerprint(cfg: Config) -> str:
    """SHA-256 of the resolved config (what a resumed run must match)."""
    return hashlib.sha256(dump_toml(config_to_dict(cfg)).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(state: ServerState) -> dict[str, torch.Tensor]:
    out = {}
    for name, pair in state.adapter.items():
        out[f"adapter/{name}/A"] = pair.A.detach().contiguous().float()
        out[f"adapter/{name}/B"] = pair.B.detach().contiguous().float()
    for name, delta in (state.base_delta or {}).items():
        out[f"base_delta/{name}"] = delta.detach().contiguous().float()
    return out


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    run_dir: str | Path, state: ServerState, rounds: list[dict[str, Any]], cfg: Config
) -> Path:
    """Write the checkpoint of ``state`` (after round ``state.round``) atomically."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{state.round:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        tensors = _tensors(state)
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {
            "round": state.round,
            "client_ranks": list(state.client_ranks),
            "broadcast_bytes": state.broadcast_bytes,
            "has_base_delta": state.base_delta is not None,
            "rounds": rounds,
            "config_sha256": config_fingerprint(cfg),
            "tensors_sha256": _checksum(tensors),
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(name, encoding="utf-8")
    with open(latest_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, root / "LATEST")
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read(folder: Path, cfg: Config) -> tuple[ServerState, list[dict[str, Any]]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if meta.get("config_sha256") != config_fingerprint(cfg):
        raise CheckpointError(
            f"{folder}: checkpoint was written by a different configuration; resume with the run's own "
            "config.toml or start a new --out folder"
        )
    if meta.get("tensors_sha256") != _checksum(tensors):
        raise CheckpointError(f"{folder}: checkpoint tensors do not match their checksum (damaged file)")
    adapter = {}
    names = sorted({k.split("/")[1] for k in tensors if k.startswith("adapter/")})
    for name in names:
        adapter[name] = LoRAPair(tensors[f"adapter/{name}/A"], tensors[f"adapter/{name}/B"])
    base = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("base_delta/")}
    state = ServerState(
        round=int(meta["round"]),
        adapter=adapter,
        client_ranks=tuple(int(r) for r in meta["client_ranks"]),
        base_delta=base if meta.get("has_base_delta") else None,
        broadcast_bytes=int(meta.get("broadcast_bytes", 0)),
    )
    return state, list(meta["rounds"])


def load_checkpoint(
    run_dir: str | Path, cfg: Config, log: Any = None
) -> tuple[ServerState, list[dict[str, Any]]] | None:
    """The newest usable checkpoint (falling back to older ones), or None if there is none.

    Raises CheckpointError if checkpoints exist but none is usable.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("round-*") if p.is_dir()), reverse=True)
    if not candidates:
        return None
    errors = []
    for folder in candidates:
        try:
            return _read(folder, cfg)
        except CheckpointError as exc:
            errors.append(str(exc))
            if log is not None:
                log(f"skipping checkpoint: {exc}")
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no usable checkpoint: {errors[0]}")
