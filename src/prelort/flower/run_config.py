"""The Flower app's run-config keys: PreLort's own config keys, flat and typed.

``flwr run . --run-config "run.rounds=5 train.lr=0.01 run.method='segment'"``: every key of
PreLort's TOML config (``prelort config --keys``) is a run-config key of the same dotted name,
declared in ``[tool.flwr.app.config]`` of the app's pyproject with its built-in default:

- a key with a scalar default keeps its type (``run.rounds = 20``, ``train.lr = 0.001``);
- a list or table key takes its TOML text as a string (``clients.levels = "[2, 4, 8, 16]"``);
- a key without a default (``clients.ranks``, ``train.max_grad_norm``, the ``[privacy]``
  keys, ...) is declared ``""``: unset; any other string is its TOML text;
- ``clients.num_clients`` is declared ``0``: as many clients as the federation has
  SuperNodes, unless the base config file or ``set`` names it.

Beside them, the app keys of ``APP_KEYS``: ``config`` (an optional base TOML file on the
SuperLink host), ``set`` (``;``-separated overrides, as ``prelort run --set``), ``out`` and
three timeouts. Flower hands the ServerApp the declared defaults fused with the overrides,
so it cannot tell a key given at its default from one left alone: a key is applied when its
value differs from PreLort's built-in default, after the base file and before ``set``. A key
left at its default therefore keeps the base file's value. No flwr import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prelort.config import parse_override, toml_value
from prelort.config_doc import config_keys
from prelort.errors import ConfigError

Scalar = bool | int | float | str

APP_KEYS: dict[str, Scalar] = {
    "config": "",
    "set": "",
    "out": "",
    "node-timeout": 120.0,
    "round-timeout": 3600.0,
    "poll-interval": 0.2,
}
"""The run-config keys of the app itself, with their defaults."""

APP_KEY_DOCS: dict[str, str] = {
    "config": 'Base PreLort TOML config on the SuperLink host (absolute path); "" = built-in defaults.',
    "set": "';'-separated overrides applied last, as `prelort run --set`: "
    '"run.rounds=2; clients.ranks=[2, 8]".',
    "out": 'Results folder on the SuperLink host ("" = ./prelort-flower-<run id>).',
    "node-timeout": "Seconds to wait for the SuperNodes to connect.",
    "round-timeout": "Seconds to wait for the replies of one round.",
    "poll-interval": "Seconds between pulls for replies.",
}

FOLLOW_KEY = "clients.num_clients"
"""Declared 0: the number of clients follows the federation's number of SuperNodes."""


def _builtin_defaults() -> dict[str, Any]:
    """Every config key -> its built-in default (None where it has none)."""
    return {k.key: k.default for k in config_keys()}


def flat_defaults() -> dict[str, Scalar]:
    """Every config key -> its declared run-config default (see the module docstring)."""
    out: dict[str, Scalar] = {}
    for key, default in _builtin_defaults().items():
        if default is None:
            out[key] = ""
        elif isinstance(default, list | dict):
            out[key] = "{}" if default == {} else toml_value(default)
        else:
            out[key] = default
    out[FOLLOW_KEY] = 0
    return out


def run_config_defaults() -> dict[str, Scalar]:
    """The whole ``[tool.flwr.app.config]`` of the app, flattened as Flower flattens it."""
    return {**APP_KEYS, **flat_defaults()}


def flat_overrides(run_config: Mapping[str, Scalar]) -> tuple[str, ...]:
    """``key=value`` overrides (``prelort run --set`` syntax) for every config key of
    ``run_config`` whose value differs from the built-in default, in declaration order.

    ``clients.num_clients`` is applied only when positive (0: follow the federation).
    """
    overrides: list[str] = []
    for key, default in _builtin_defaults().items():
        if key not in run_config:
            continue
        value = run_config[key]
        if key == FOLLOW_KEY and value == 0:
            continue
        if default is None and isinstance(value, str):  # TOML text; "" = unset
            if value.strip():
                overrides.append(f"{key}={value}")
        elif isinstance(default, list | dict) and isinstance(value, str):  # TOML text
            if not value.strip():
                example = flat_defaults()[key]
                raise ConfigError(f"run config: {key} is empty; give its TOML value, e.g. {example}")
            if parse_override(f"{key}={value}")[1] != default:
                overrides.append(f"{key}={value}")
        elif value != default or isinstance(value, bool) != isinstance(default, bool):
            overrides.append(f"{key}={toml_value(value)}")
    return tuple(overrides)


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` block of the app's pyproject, one comment per key.

    ``python -m prelort.flower.run_config`` prints it; a test holds both pyprojects to it.
    """
    meaning = {k.key: k.doc for k in config_keys()}
    lines = [
        "[tool.flwr.app.config]",
        "# Generated by `python -m prelort.flower.run_config` (prelort/flower/run_config.py).",
    ]
    for key, value in APP_KEYS.items():
        lines += [f"# {APP_KEY_DOCS[key]}", f"{key} = {toml_value(value)}"]
    doc = {**meaning, FOLLOW_KEY: "Number of clients; 0 = the federation's number of SuperNodes."}
    for key, value in flat_defaults().items():
        text = " ".join(doc.get(key, "").split())
        if text:
            lines.append(f"# {text.split('. ')[0].rstrip('.')}.")
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(app_config_toml(), end="")
