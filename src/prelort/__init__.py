"""PreLort: federated heterogeneous-rank LoRA with prefix-nested adapters.

The first r rank dimensions of the global adapter are a good rank-r adapter for every r:
segment-wise aggregation averages each rank segment over the clients that own it, and
prefix-nested local training concentrates signal in the low-rank prefix.
"""

from prelort.adapters import Adapter, LoRAPair, NestedLoRA, Scaling
from prelort.aggregation import AggregationResult, ClientUpdate, aggregate

__all__ = [
    "Adapter",
    "AggregationResult",
    "ClientUpdate",
    "LoRAPair",
    "NestedLoRA",
    "Scaling",
    "aggregate",
]
__version__ = "0.1.0"
