"""Lazy package attributes: a package's public names are imported on first use.

Keeps ``import prelort.adapters`` / ``import prelort.federation`` free of torch and PEFT, so
the pure config validation stays fast (docs/design.md §8).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[name]`` (a module path) and returns its attribute."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
