"""FLoRA: stacking-based aggregation, exact and merged into the base weights.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024. Per module the server stacks

    A_g = [p_1 A_1; p_2 A_2; ...; p_K A_K]   (sum_k r_k, in)
    B_g = [s_1 B_1, s_2 B_2, ..., s_K B_K]     (out, sum_k r_k)

with p_k = n_k / sum_j n_j on A (as in the reference code ATP-1010/FederatedLLM) and
s_k = s(r_k) folded into B, so that B_g @ A_g = sum_k p_k s(r_k) B_k A_k exactly (no cross
terms, unlike averaging A and B separately). Clients merge B_g A_g into their base weights
and start a fresh adapter (A random, B = 0) next round; the stacked factors are what
travels down, so the download grows with the number and ranks of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, LoRAPair, adapter_num_bytes, init_adapter
from prelort.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    MergingRule,
    check_updates,
    data_weights,
    register,
)


def stack_updates(updates: Sequence[ClientUpdate], p: torch.Tensor, scale: list[float]) -> Adapter:
    """The stacked factors (A_g, B_g) of every module."""
    out: Adapter = {}
    for name in updates[0].adapter:
        A = torch.cat([u.adapter[name].A.double() * w for u, w in zip(updates, p.tolist(), strict=True)])
        B = torch.cat([u.adapter[name].B.double() * s for u, s in zip(updates, scale, strict=True)], dim=1)
        out[name] = LoRAPair(A.float(), B.float())
    return out


@register("flora")
class FLoRA(MergingRule):
    """Stack, merge into the base weights, re-initialise the adapter."""

    name = "flora"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        p = data_weights(updates)
        scale = [self.options.scale(u.rank) for u in updates]
        stacked = stack_updates(updates, p, scale)
        base_delta = {name: pair.delta().float() for name, pair in stacked.items()}
        generator = self.options.generator or torch.Generator().manual_seed(0)
        shapes = {name: (g.B.shape[0], g.A.shape[1]) for name, g in global_adapter.items()}
        fresh = init_adapter(shapes, max_rank, generator)
        return AggregationResult(fresh, base_delta=base_delta, broadcast_bytes=adapter_num_bytes(stacked))
