"""PreLort on Flower: a ``ServerApp``/``ClientApp`` pair over the framework-free federation steps.

- ``settings``: run config (``config`` file + ``set`` overrides) and node config
  (``partition-id``, ``rank``) -> validated ``Config`` (no flwr import);
- ``records``: adapters <-> fp32 ``ArrayRecord``;
- ``strategy``: ``PrefixStrategy``, each node gets its own rank's downlink, aggregation is
  ``server_update`` (the simulator's function);
- ``server_app`` / ``client_app``: the apps named in ``app/pyproject.toml``;
- ``certs``: a CA, a SuperLink certificate and SuperNode keys for a test federation;
- ``local``: a loopback deployment (one SuperLink, N SuperNodes, ``flwr run``) in one call.

Nothing here is imported by ``import prelort``; flwr is needed only by these modules.
See docs/flower.md.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App folder (its ``pyproject.toml``) to pass to ``flwr run``."""

__all__ = ["APP_DIR"]
