"""Federation: the run plan, the round driver, client/server steps and the in-process simulator.

Names are imported lazily so that ``prelort.federation.methods`` (used by the pure config
validation) does not pull in torch.
"""

from __future__ import annotations

from prelort._lazy import lazy_getattr

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

__getattr__ = lazy_getattr("prelort.federation", _LAZY)
