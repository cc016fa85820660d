"""Validated run configuration: TOML file + ``--set key=value`` overrides -> ``Config``.

Unknown keys, wrong types and inconsistent values raise ``ConfigError`` with one line
naming the key and what to do (docs/design.md §8: exit status 2). The sections are in
``prelort.config_sections`` (each checks itself) and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from prelort.config_sections import (
    AggregationSection,
    ClientsSection,
    FloristSection,
    HetLoRASection,
    LoRASection,
    PrivacySection,
    RunSection,
    TrainSection,
    _choice,
)
from prelort.config_workload import LLMSection, SyntheticSection, WorkloadSection
from prelort.errors import ConfigError
from prelort.source_registry import needs_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AggregationSection",
    "ClientsSection",
    "Config",
    "ConfigError",
    "FloristSection",
    "HetLoRASection",
    "LLMSection",
    "LoRASection",
    "PrivacySection",
    "RunSection",
    "SyntheticSection",
    "TrainSection",
    "WorkloadSection",
    "config_from_dict",
    "config_to_dict",
    "dump_toml",
    "load_config",
    "parse_override",
    "same_config",
    "sum_methods",
]


@dataclass
class Config:
    """A whole run."""

    run: RunSection = field(default_factory=RunSection)
    clients: ClientsSection = field(default_factory=ClientsSection)
    lora: LoRASection = field(default_factory=LoRASection)
    train: TrainSection = field(default_factory=TrainSection)
    hetlora: HetLoRASection = field(default_factory=HetLoRASection)
    florist: FloristSection = field(default_factory=FloristSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    llm: LLMSection = field(default_factory=LLMSection)
    privacy: PrivacySection | None = None
    """Absent (None) unless the config has a [privacy] section; then config_to_dict drops
    it, so configs and results of runs without it are unchanged."""

    @property
    def max_rank(self) -> int:
        return max(self.clients.levels)

    def validate(self) -> None:
        """Every section's own checks (``<Section>.validate``) and the checks across sections;
        raises ConfigError with one line naming the key and the fix.

        Every number is checked (finite, in range, consistent with the others), so no size,
        rate or limit reaches the numerics unchecked. Pure: imports no torch.
        """
        from prelort.federation.methods import ORDER_RULES, get_method, resolve_order

        run, cl = self.run, self.clients
        import_plugins(run.plugins)
        try:
            spec = get_method(run.method)
        except ValueError as exc:
            raise ConfigError(f"run.method: {exc}") from None
        if spec.level is not None and spec.level not in cl.levels:
            raise ConfigError(
                f"run.method = {run.method!r}: rank {spec.level} is not in clients.levels {cl.levels}"
            )
        run.validate()
        cl.validate()
        if run.clients_per_round > cl.num_clients:
            raise ConfigError(
                f"run.clients_per_round = {run.clients_per_round} is more than clients.num_clients = "
                f"{cl.num_clients}; lower it or add clients"
            )
        bad_eval = [lv for lv in run.eval_levels if lv not in cl.levels]
        if bad_eval:
            raise ConfigError(f"run.eval_levels: {bad_eval} not in clients.levels {cl.levels}")
        self.lora.validate()
        self.train.validate()

        self.aggregation.validate()
        if self.aggregation.order not in ("auto", "ownership") and spec.rule not in ORDER_RULES:
            raise ConfigError(
                f"aggregation.order = {self.aggregation.order!r} applies to the segment-wise methods "
                f"({', '.join(ORDER_RULES)}); run.method = {run.method!r} is not one (omit it)"
            )
        order = resolve_order(spec, self.aggregation.order)
        if self.train.factors == "b-only" and order == "round" and spec.rule in ORDER_RULES:
            raise ConfigError(
                'train.factors = "b-only" keeps A frozen, which aggregation.order = "round" rotates '
                f'(run.method = {run.method!r}); set aggregation.order = "ownership" or "export"'
            )

        h = self.hetlora
        h.validate()
        self.florist.validate()
        if h.min_rank is not None and h.min_rank > self.max_rank:
            raise ConfigError(
                f"hetlora.min_rank = {h.min_rank} is above the largest rank level {self.max_rank}; "
                "lower it (or omit it: the smallest level)"
            )

        self.synthetic.validate()
        self.workload.validate()
        if self.workload.kind == "synthetic" and (
            self.train.gradient_checkpointing or self.train.autocast == "fp16"
        ):
            raise ConfigError(
                "train.gradient_checkpointing and train.autocast = 'fp16' need an LLM workload (a Hugging "
                "Face model on CUDA); the synthetic workload has neither"
            )
        llm = self.llm
        llm.validate()
        if self.workload.kind == "llm" and needs_path(llm.source) and not llm.path:
            raise ConfigError(
                f"llm.path is required for llm.source = {llm.source!r} (a file, folder or hub id)"
            )
        if (
            self.workload.kind == "llm"
            and llm.eval_source
            and needs_path(llm.eval_source)
            and not (llm.eval_path or llm.path)
        ):
            raise ConfigError(
                f"llm.eval_path is required for llm.eval_source = {llm.eval_source!r} "
                "(a file, folder or hub id)"
            )
        if self.workload.kind == "llm" and llm.quantization != "none" and spec.family == "merged":
            raise ConfigError(
                f"run.method = {run.method!r} merges updates into the base weights, which "
                f"llm.quantization = {llm.quantization!r} keeps quantised; use llm.quantization = 'none'"
            )
        if self.privacy is not None:
            self._validate_privacy(self.privacy, spec.rule)

    def _validate_privacy(self, p: PrivacySection, rule: str) -> None:
        """[privacy]: its own checks, with its checks against run.clients_per_round and the
        method between its values and its consistency."""
        p.validate_values()
        cpr = self.run.clients_per_round
        if p.secagg_bits > 30 or cpr * 2**p.secagg_bits >= 2**32:
            raise ConfigError(
                f"privacy.secagg_bits = {p.secagg_bits} overflows SecAgg+'s 32-bit sums with "
                f"{cpr} clients per round; lower it (clients_per_round * 2^bits < 2^32)"
            )
        if not _has_sum_form(rule):
            raise ConfigError(
                f"[privacy] needs a method whose aggregation is a ratio of sums ({sum_methods()}); "
                f"run.method = {self.run.method!r} is not one"
            )
        p.validate_consistency()
        if p.secure_aggregation and cpr < 2:
            raise ConfigError(
                "privacy.secure_aggregation needs run.clients_per_round >= 2 "
                "(a sum of one update is that update)"
            )


def import_plugins(modules: list[str]) -> None:
    """Import ``run.plugins`` (modules registering rules and methods); ConfigError if one fails."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure of a user module is a config problem
            raise ConfigError(
                f"run.plugins: cannot import {name!r} ({type(exc).__name__}: {exc}); "
                "give an importable module name (on PYTHONPATH)"
            ) from None


def _has_sum_form(rule: str) -> bool:
    """Whether aggregation rule ``rule`` is a ratio of sums (its ``sum_form``, docs/design.md
    §4.9). Only a ``[privacy]`` config asks, so only it imports the rules (and torch)."""
    from prelort.aggregation import RULES

    return rule in RULES and RULES[rule].sum_form


def sum_methods() -> str:
    """The methods whose rule has a sum form, for messages (``fedit-rN`` stands for the oracles)."""
    from prelort.federation.methods import METHODS

    names = [m.name for m in METHODS.values() if _has_sum_form(m.rule)]
    return ", ".join(names + (["fedit-rN"] if _has_sum_form("fedit") else []))


# -- parsing -----------------------------------------------------------------------------------
def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        _choice(key, value, get_args(tp))
        return value
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    choices: dict[str, Callable[[], Sequence[str]]] = getattr(cls, "CHOICES", {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(
                f"unknown key {full!r}; valid keys{' in [' + prefix + ']' if prefix else ''}: "
                f"{', '.join(sorted(names))}"
            )
        if key in choices:
            _choice(full, value, choices[key]())
        kwargs[key] = _check_value(full, value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); value parsed as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set run.rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from a TOML-shaped dict and ``key=value`` overrides."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    cfg: Config = _build(Config, merged)
    cfg.validate()
    # resolved once here, so the saved config.toml names the data seed a run used
    if cfg.synthetic.data_seed is None:
        cfg.synthetic.data_seed = cfg.run.seed
    if cfg.llm.data_seed is None:
        cfg.llm.data_seed = cfg.run.seed
    if cfg.hetlora.min_rank is None:
        cfg.hetlora.min_rank = min(cfg.clients.levels)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's raw tables (ConfigError with one line if missing or not TOML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing TOML file to --config")
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    return data


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config file (or defaults when ``path`` is None) and apply overrides."""
    return config_from_dict(read_toml(path) if path is not None else {}, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a plain dict (None values dropped, as TOML has no null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        return obj

    out: dict[str, Any] = clean(dataclasses.asdict(cfg))
    return out


def toml_value(v: Any) -> str:
    """One value as TOML text (scalars, lists and inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for the resolved config (tables of scalars and lists)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def same_config(stored: Any, current: dict[str, Any], unused: typing.AbstractSet[str] = frozenset()) -> bool:
    """Whether a finished run's stored config is ``current``: every key it stored is equal.

    Keys added to the config after the run was made are not in ``stored`` and are taken to
    have had their default, so finished results stay reusable across versions. Keys in
    ``unused`` (``section.key``, the keys the run's method never reads:
    ``federation.methods.unused_keys``) may differ.
    """
    if not isinstance(stored, dict):
        return False
    for section, values in stored.items():
        now = current.get(section)
        if not isinstance(values, dict) or not isinstance(now, dict):
            return False
        for key, value in values.items():
            if f"{section}.{key}" in unused:
                continue
            if key not in now or now[key] != value:
                return False
    return True
