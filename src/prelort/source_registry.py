"""The registry of data sources by name, importable without torch.

:data:`SOURCES` maps a name to its loader (a function returning a list of
:class:`prelort.data.Example`); :func:`register_source` adds one. ``prelort.data.sources``
registers the built-in loaders here and re-exports both names, and ``prelort.config`` checks
``llm.source`` against :func:`source_names`. The config must not import the loaders
(``prelort.data`` imports torch), so the built-in names are also listed in
:data:`BUILTIN_SOURCES`; ``tests/test_config_sources.py`` checks that list against the loaders.

A registered source is chosen with ``llm.source = "name"``; the LLM workload passes it the
``[llm]`` options its loader names (``prelort.workloads.llm``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from typing import TypeAlias

    from prelort.data.examples import Example

    SourceLoader: TypeAlias = Callable[..., list[Example]]

_F = TypeVar("_F", bound="SourceLoader")

SOURCES: dict[str, SourceLoader] = {}
"""Registry of data sources by name (``load_source(kind)`` looks them up here)."""

BUILTIN_MODULE = "prelort.data.sources"
"""The module that registers the built-in sources when imported."""

BUILTIN_SOURCES: dict[str, bool] = {
    "bbc-news": False,
    "natural-instructions": True,
    "multiple-choice": True,
    "local": True,
    "hub": True,
}
"""The sources :data:`BUILTIN_MODULE` registers, in its order, each with whether it needs
``llm.path`` (its loader has a required ``path`` or ``dataset_id`` argument)."""

PATH_ARGUMENTS = ("path", "dataset_id")
"""Loader arguments that ``llm.path`` fills (a file or folder; a hub dataset id)."""


def register_source(name: str) -> Callable[[_F], _F]:
    """Register a loader function under ``name`` in :data:`SOURCES`."""

    def decorator(loader: _F) -> _F:
        builtin_elsewhere = name in BUILTIN_SOURCES and loader.__module__ != BUILTIN_MODULE
        if name in SOURCES or builtin_elsewhere:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = loader
        return loader

    return decorator


def source_names() -> tuple[str, ...]:
    """Every source name: the built-in ones, then the others in the order they were registered."""
    return (*BUILTIN_SOURCES, *(name for name in SOURCES if name not in BUILTIN_SOURCES))


def takes_required_path(loader: SourceLoader) -> bool:
    """Whether ``loader`` has a :data:`PATH_ARGUMENTS` argument without a default."""
    parameters = inspect.signature(loader).parameters
    return any(
        name in parameters and parameters[name].default is inspect.Parameter.empty for name in PATH_ARGUMENTS
    )


def needs_path(name: str) -> bool:
    """Whether source ``name`` (one of :func:`source_names`) needs ``llm.path``."""
    loader = SOURCES.get(name)
    return BUILTIN_SOURCES[name] if loader is None else takes_required_path(loader)
