"""From Flower's run and node configuration to PreLort's validated ``Config``.

``flwr run --run-config`` carries only flat scalars whose keys must exist in the app's
``[tool.flwr.app.config]`` (``prelort/flower/app/pyproject.toml``), so a run names the
same TOML file and ``--set`` overrides as ``prelort run``:

    config = "/abs/path/configs/synthetic.toml"      # read on the SuperLink host
    set    = "run.rounds=2; run.method='segment'"    # ';'-separated key=value overrides
    out    = "/abs/path/runs/flower"                 # results.json etc. (SuperLink host)

Both are validated with ``load_config``, so a bad run config fails with the one-line
``ConfigError`` message of ``prelort run``. Each SuperNode states its data partition and
rank capacity in ``--node-config "partition-id=0 rank=8"``. No flwr import here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prelort.config import Config, config_from_dict, config_to_dict, load_config
from prelort.errors import ConfigError

RUN_CONFIG_KEYS = ("config", "set", "out", "node-timeout", "round-timeout", "poll-interval")
"""Keys of ``[tool.flwr.app.config]``; ``flwr run`` refuses any other key."""

ScalarMap = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class RunSettings:
    """What a Flower run needs besides the PreLort ``Config``."""

    config_path: str
    """TOML file on the SuperLink host (empty: built-in defaults)."""
    overrides: tuple[str, ...]
    """``key=value`` overrides applied after the file, as ``prelort run --set``."""
    out: str
    """Results folder on the SuperLink host (empty: ``./prelort-flower-<run id>``)."""
    node_timeout: float = 120.0
    """Seconds to wait for ``clients.num_clients`` SuperNodes to connect."""
    round_timeout: float = 3600.0
    """Seconds to wait for the replies of one round."""
    poll_interval: float = 0.2
    """Seconds between pulls for replies (Flower's own ``send_and_receive`` waits 3 s)."""

    def load(self) -> Config:
        """The validated Config (``ConfigError`` with one clear line when invalid)."""
        path = os.path.expandvars(os.path.expanduser(self.config_path)) if self.config_path else None
        if path is not None and not Path(path).is_absolute() and not Path(path).is_file():
            raise ConfigError(
                f"run config: config file {path!r} not found relative to {os.getcwd()!r} "
                "(the SuperLink's working directory); pass an absolute path"
            )
        return load_config(path, self.overrides)


def split_overrides(text: str) -> tuple[str, ...]:
    """Split ``"a.b=1; c.d='x;y'"`` at semicolons (and newlines) outside quotes and brackets."""
    parts: list[str] = []
    buf: list[str] = []
    quote = ""
    depth = 0
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch in ";\n" and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return tuple(p.strip() for p in parts if p.strip())


def settings_from_run_config(run_config: ScalarMap) -> RunSettings:
    """Read the app's run config (``context.run_config``); ConfigError on a wrong type."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}; valid keys: {', '.join(RUN_CONFIG_KEYS)}")

    def text(key: str) -> str:
        value = run_config.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"run config: {key} must be a string, got {value!r}")
        return value

    def seconds(key: str, default: float) -> float:
        value = run_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"run config: {key} must be a positive number of seconds, got {value!r}")
        return float(value)

    return RunSettings(
        config_path=text("config"),
        overrides=split_overrides(text("set")),
        out=text("out"),
        node_timeout=seconds("node-timeout", RunSettings.node_timeout),
        round_timeout=seconds("round-timeout", RunSettings.round_timeout),
        poll_interval=seconds("poll-interval", RunSettings.poll_interval),
    )


# -- what travels: the resolved config, and what a node says about itself --------------------
def config_to_json(cfg: Config) -> str:
    """The resolved config as JSON (sent to every client, so nodes need no config file)."""
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> Config:
    """Inverse of ``config_to_json`` (validated)."""
    return config_from_dict(json.loads(text))


@dataclass(frozen=True)
class NodeInfo:
    """What a SuperNode reports in the QUERY round: its partition (client id) and rank."""

    partition_id: int
    rank: int | None
    """Rank capacity r_k; None: taken from the run's config (``clients.ranks`` or drawn)."""


def node_info_from_config(node_config: ScalarMap) -> NodeInfo:
    """Parse ``--node-config "partition-id=0 rank=8"``; ConfigError if malformed."""
    pid = node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ConfigError(
            f"node config: partition-id must be a non-negative integer, got {pid!r}; "
            'start the SuperNode with --node-config "partition-id=0 rank=8"'
        )
    rank = node_config.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"node config: rank must be a positive integer, got {rank!r}")
    return NodeInfo(pid, rank)


def with_node_ranks(cfg: Config, infos: Mapping[int, NodeInfo]) -> Config:
    """``cfg`` with ``clients.ranks`` taken from the nodes (a node's own rank wins).

    ``infos`` maps client id (= partition id) to what that node reported and must cover
    ``0..num_clients-1`` exactly. Nodes without a rank keep the config's rank for their id.
    """
    k = cfg.clients.num_clients
    if sorted(infos) != list(range(k)):
        raise ConfigError(
            f"SuperNodes report partition ids {sorted(infos)}, but clients.num_clients = {k} needs "
            f"exactly 0..{k - 1}; give each SuperNode its own --node-config partition-id"
        )
    from prelort.federation.plan import assign_ranks

    default = assign_ranks(cfg)
    ranks = [infos[i].rank if infos[i].rank is not None else default[i] for i in range(k)]
    data = config_to_dict(cfg)
    data["clients"]["ranks"] = ranks
    return config_from_dict(data)
