"""Federation: the run plan, the round driver, client/server steps and the in-process simulator.

Names are imported lazily so that ``prelort.federation.methods`` (used by the pure config
validation) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "METHODS": "prelort.federation.methods",
    "MethodSpec": "prelort.federation.methods",
    "get_method": "prelort.federation.methods",
    "ClientResult": "prelort.federation.core",
    "ServerState": "prelort.federation.core",
    "client_update": "prelort.federation.core",
    "server_update": "prelort.federation.core",
    "run_simulation": "prelort.federation.simulator",
    "Workload": "prelort.federation.workload",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prelort.federation' has no attribute {name!r}")
