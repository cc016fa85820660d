"""PreLort on Flower: a ``ServerApp``/``ClientApp`` pair over the framework-free federation steps.

- ``settings``: run config (``config`` file + ``set`` overrides) and node config
  (``partition-id``, ``rank``) -> validated ``Config`` (no flwr import);
- ``records``: adapters <-> fp32 ``ArrayRecord``;
- ``strategy``: ``HeteroRankLoRA``, a Flower ``FedAvg`` for any user's ServerApp: each node gets
  its own rank's downlink, aggregation by a registered rule (segment-wise by default), and
  ``query_ranks`` to learn the nodes' ranks;
- ``server_app`` / ``client_app``: PreLort's own apps (the shared round driver), named in
  ``app/pyproject.toml``; ``transport``: the driver's Flower transport; ``worker`` /
  ``worker_protocol``: warm per-node workers; ``secure``: SecAgg+;
- ``certs``: a CA, a SuperLink certificate and SuperNode keys for a test federation;
- ``local`` / ``launch``: a loopback deployment or simulation (``prelort run --runtime flower-...``).

Nothing here is imported by ``import prelort``; flwr is needed only by these modules.
See docs/flower.md.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App folder (its ``pyproject.toml``) to pass to ``flwr run``."""

__all__ = ["APP_DIR"]
