"""Atomic, checksummed per-round checkpoints of the server state and the results so far.

Layout in the run directory::

    checkpoints/round-000012/state.safetensors   adapter A/B and the rule's own state tensors
    checkpoints/round-000012/state.json          round, client ranks, results so far,
                                                 config fingerprint, checksums
    checkpoints/LATEST                           name of the newest committed checkpoint

A checkpoint folder is written under a temporary name (``.round-000012.XXXX``), every file
fsynced, then renamed; LATEST is replaced atomically last (``reporting.files``, the one
atomic-write helper). ``state.json`` carries the SHA-256 of ``state.safetensors`` and a
SHA-256 of its own content, so everything a resume restores is covered by a checksum.

Loading tries the checkpoint LATEST names first, then the others newest first: one that
fails the schema check, a checksum or the config fingerprint is skipped with a logged line
(the two newest are kept, so a damaged newest one falls back to the previous one); none
usable is a one-line ``CheckpointError``. Temporary files and folders left by a killed
writer are removed when a run starts in the folder. Client randomness is derived from
(seed, round, client) and the rule's from (seed, round), so no RNG state needs saving.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prelort.adapters.state import LoRAPair
from prelort.atomic_files import atomic_write_bytes, atomic_write_text, fsync_dir, umask_mode
from prelort.config import Config, config_to_dict, dump_toml
from prelort.errors import UserError
from prelort.federation.core import ServerState

CHECKPOINT_DIR = "checkpoints"
KEEP = 2
FORMAT = 3
STATE_FILE = "state.json"
TENSORS_FILE = "state.safetensors"
LATEST_FILE = "LATEST"
_NAME = re.compile(r"round-(\d{6,})")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, damaged, or from another configuration."""


def config_fingerprint(cfg: Config) -> str:
    """SHA-256 of the resolved config (what a resumed run must match)."""
    return hashlib.sha256(dump_toml(config_to_dict(cfg)).encode()).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its own ``sha256`` entry."""
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "sha256"})).hexdigest()


def _encode(state: ServerState) -> dict[str, torch.Tensor]:
    """The tensors to store: adapter factors (float32) and the rule state, bit for bit."""
    tensors: dict[str, torch.Tensor] = {}
    for name, pair in state.adapter.items():
        tensors[f"adapter/{name}/A"] = pair.A.detach().contiguous().float()
        tensors[f"adapter/{name}/B"] = pair.B.detach().contiguous().float()
    for key, t in state.rule_state.items():  # carried unopened (docs/design.md §6)
        tensors[f"rule/{key}"] = t.detach().contiguous()
    return tensors


def save_checkpoint(
    run_dir: str | Path, state: ServerState, rounds: list[dict[str, Any]], cfg: Config
) -> Path:
    """Write the checkpoint of ``state`` (after round ``state.round``) atomically."""
    from safetensors.torch import save as safetensors_bytes

    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{state.round:06d}"
    blob = safetensors_bytes(_encode(state))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "round": state.round,
        "client_ranks": list(state.client_ranks),
        "rounds": rounds,
        "config_sha256": config_fingerprint(cfg),
        "files": {TENSORS_FILE: hashlib.sha256(blob).hexdigest()},
    }
    meta = json.loads(json.dumps(meta))  # the form it is read back in (e.g. int dict keys -> str)
    meta["sha256"] = _meta_digest(meta)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    tmp.chmod(umask_mode(directory=True))  # mkdtemp makes 0o700; the round folder gets the umask
    final = root / name
    try:
        atomic_write_bytes(tmp / TENSORS_FILE, blob)
        atomic_write_text(tmp / STATE_FILE, json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, name)
    for old in _folders(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _folders(root: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _schema_problem(meta: Any, cfg: Config, folder_round: int) -> str | None:
    """What is wrong with the shape of ``state.json`` (None: nothing)."""
    if not isinstance(meta, dict):
        return f"{STATE_FILE} holds a {type(meta).__name__}, not an object"
    required: dict[str, tuple[type, ...]] = {
        "format": (int,),
        "round": (int,),
        "client_ranks": (list,),
        "rounds": (list,),
        "config_sha256": (str,),
        "files": (dict,),
        "sha256": (str,),
    }
    for key, types_ in required.items():
        if key not in meta:
            return f"{STATE_FILE} misses key {key!r}"
        value = meta[key]
        if not isinstance(value, types_) or (types_ == (int,) and isinstance(value, bool)):
            return f"{STATE_FILE}: {key!r} is a {type(value).__name__}, expected {types_[0].__name__}"
    if meta["format"] != FORMAT:
        return f"checkpoint format {meta['format']} (this prelort reads format {FORMAT})"
    if meta["round"] < 0 or meta["round"] != folder_round:
        return f"{STATE_FILE}: round {meta['round']} does not match the folder (round {folder_round})"
    ranks = meta["client_ranks"]
    n, top = cfg.clients.num_clients, cfg.max_rank
    if len(ranks) != n or not all(_is_int(r) and 1 <= r <= top for r in ranks):
        return f"{STATE_FILE}: client_ranks must be {n} integers in 1..{top}, got {ranks!r:.80}"
    rounds = meta["rounds"]
    if not rounds or not all(isinstance(r, dict) and _is_int(r.get("round")) for r in rounds):
        return f"{STATE_FILE}: rounds must be a non-empty list of records with an integer 'round'"
    numbers = [r["round"] for r in rounds]
    if numbers != sorted(set(numbers)) or numbers[-1] != meta["round"]:
        return f"{STATE_FILE}: rounds {numbers[:3]}...{numbers[-1:]} do not end at round {meta['round']}"
    if set(meta["files"]) != {TENSORS_FILE} or not all(isinstance(v, str) for v in meta["files"].values()):
        return f"{STATE_FILE}: 'files' must name {TENSORS_FILE} and its checksum"
    return None


def _read(folder: Path, cfg: Config) -> tuple[ServerState, list[dict[str, Any]]]:
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    m = _NAME.fullmatch(folder.name)
    folder_round = int(m.group(1)) if m else -1
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        blob = (folder / TENSORS_FILE).read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    problem = _schema_problem(meta, cfg, folder_round)
    if problem is not None:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({problem})")
    if meta["sha256"] != _meta_digest(meta):
        raise CheckpointError(f"{folder}: {STATE_FILE} does not match its checksum (damaged file)")
    if meta["config_sha256"] != config_fingerprint(cfg):
        raise CheckpointError(
            f"{folder}: checkpoint was written by a different configuration; resume with the run's own "
            "config.toml or start a new --out folder"
        )
    if meta["files"][TENSORS_FILE] != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{folder}: {TENSORS_FILE} does not match its checksum (damaged file)")
    try:
        tensors = safetensors_load(blob)
        state = _decode(meta, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    return state, list(meta["rounds"])


def _decode(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ServerState:
    """The ServerState of a checkpoint whose schema and checksums were checked."""
    adapter: dict[str, LoRAPair] = {}
    rule_state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "adapter" and rest.endswith(("/A", "/B")):
            continue
        if kind == "rule" and rest:
            rule_state[rest] = t
        else:
            raise ValueError(f"unexpected tensor {key!r}")
    names = sorted(
        {k.removeprefix("adapter/").rsplit("/", 1)[0] for k in tensors if k.startswith("adapter/")}
    )
    if not names:
        raise ValueError("no adapter tensors")
    for name in names:
        adapter[name] = LoRAPair(tensors[f"adapter/{name}/A"], tensors[f"adapter/{name}/B"])
    return ServerState(
        round=meta["round"],
        adapter=adapter,
        client_ranks=tuple(meta["client_ranks"]),
        rule_state=dict(sorted(rule_state.items())),
    )


def clean_temporary(run_dir: str | Path, log: Callable[[str], Any] | None = None) -> list[Path]:
    """Remove what a killed writer left in ``run_dir``: ``.round-*`` folders and ``.*.tmp`` files.

    Only safe while no other process writes to ``run_dir`` (``prelort.lock.run_lock``).
    """
    run = Path(run_dir)
    removed: list[Path] = []
    for folder in (run, run / CHECKPOINT_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".round-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(p)
            if log is not None:
                log(f"removed {p} (left by an interrupted run)")
    return removed


def _latest_first(root: Path, folders: list[Path], log: Callable[[str], Any] | None) -> list[Path]:
    """``folders`` with the one LATEST names (the last committed checkpoint) first."""
    latest = root / LATEST_FILE
    if not latest.is_file():
        return folders
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        if log is not None:
            log(f"ignoring unreadable {latest} ({exc})")
        return folders
    named = [p for p in folders if p.name == name]
    if not named and log is not None:
        log(f"{latest} names {name[:40]!r}, which is not a checkpoint folder; using the newest one")
    return named + [p for p in folders if p.name != name]


def load_checkpoint(
    run_dir: str | Path, cfg: Config, log: Any = None
) -> tuple[ServerState, list[dict[str, Any]]] | None:
    """The newest usable checkpoint (falling back to older ones), or None if there is none.

    Temporary leftovers of a killed writer are removed first. Raises CheckpointError (one
    line) if checkpoints exist but none is usable.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    clean_temporary(run_dir, log)
    if not root.is_dir():
        return None
    candidates = _latest_first(root, _folders(root), log)
    if not candidates:
        return None
    errors: list[str] = []
    for folder in candidates:
        try:
            return _read(folder, cfg)
        except CheckpointError as exc:
            errors.append(f"{folder.name}: {str(exc).removeprefix(f'{folder}: ')}")
            if log is not None:
                log(f"skipping checkpoint {folder}: {str(exc).removeprefix(f'{folder}: ')}")
    raise CheckpointError(
        f"{root}: no usable checkpoint ({'; '.join(errors)}); start the run again in a new --out folder"
    )
