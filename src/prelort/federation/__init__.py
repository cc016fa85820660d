"""Federation: framework-free client/server steps and the in-process simulator."""

from prelort.federation.core import ClientResult, ServerState, client_update, server_update
from prelort.federation.methods import METHODS, MethodSpec, get_method
from prelort.federation.simulator import run_simulation
from prelort.federation.workload import Workload

__all__ = [
    "METHODS",
    "ClientResult",
    "MethodSpec",
    "ServerState",
    "Workload",
    "client_update",
    "get_method",
    "run_simulation",
    "server_update",
]
