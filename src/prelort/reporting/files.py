"""Result files: ``results.json`` and the resolved ``config.toml`` of a run, written atomically.

The atomic-write helpers themselves live in ``prelort.atomic_files`` (a bottom module: the
adapters and checkpoints use them too) and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prelort.atomic_files import (
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    fsync_dir,
    umask_mode,
    write_json,
)
from prelort.config import Config, config_to_dict, dump_toml

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "fsync_dir",
    "umask_mode",
    "write_json",
    "write_results",
]


def write_results(out_dir: str | Path, results: dict[str, Any], cfg: Config) -> None:
    """``results.json`` and the fully resolved ``config.toml`` (docs/design.md §7)."""
    out = Path(out_dir)
    write_json(out / "results.json", results)
    atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
