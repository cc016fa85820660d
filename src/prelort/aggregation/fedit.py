"""FedIT: FedAvg of the LoRA factors, every client at one rank.

A = sum_k p_k A_k, B = sum_k p_k B_k with p_k = n_k / sum_j n_j (McMahan et al. 2017;
Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).
Rank dimensions beyond the common rank r (when r < R) are not trained and keep their value.
"""

from __future__ import annotations

from collections.abc import Sequence

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    check_updates,
    data_weights,
    register,
)


@register("fedit")
class FedIT(AggregationRule):
    """Homogeneous-rank FedAvg of A and B."""

    sum_form = True

    name = "fedit"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        check_updates(global_adapter, updates)
        ranks = {u.rank for u in updates}
        if len(ranks) != 1:
            raise ValueError(f"fedit needs every client at one rank, got ranks {sorted(ranks)}")
        r = ranks.pop()
        p = data_weights(updates)
        out: Adapter = {}
        for name, g in global_adapter.items():
            A = g.A.detach().clone()
            B = g.B.detach().clone()
            A[:r] = sum(w * u.adapter[name].A.double() for w, u in zip(p.tolist(), updates, strict=True)).to(
                A.dtype
            )
            B[:, :r] = sum(
                w * u.adapter[name].B.double() for w, u in zip(p.tolist(), updates, strict=True)
            ).to(B.dtype)
            out[name] = LoRAPair(A, B)
        return AggregationResult(out)
