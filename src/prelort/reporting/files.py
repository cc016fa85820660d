"""Atomic result files: write to a temp file, fsync, rename (a crash never leaves half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prelort.config import Config, config_to_dict, dump_toml


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_results(out_dir: str | Path, results: dict[str, Any], cfg: Config) -> None:
    """``results.json`` and the fully resolved ``config.toml`` (DESIGN.md §3)."""
    out = Path(out_dir)
    write_json(out / "results.json", results)
    atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
