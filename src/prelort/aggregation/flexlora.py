"""FlexLoRA: aggregate full-size weight changes, redistribute by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024. Per module,

    dW = sum_k p_k s(r_k) B_k A_k,   p_k = n_k / sum_j n_j,   dW = U S V^T,

the global adapter keeps the rank-R SVD factors A = V^T[:R], B = U[:, :R] S[:R] / s(R), and a
rank-r client receives the rank-r SVD truncation A = V^T[:r], B = U[:, :r] S[:r] / s(r),
so s(r) B A is the best rank-r approximation of dW.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    check_updates,
    data_weights,
    register,
    weighted_delta,
)


def svd_factors(delta: torch.Tensor, rank: int, scale: float) -> LoRAPair:
    """Rank-``rank`` factors with scale * B @ A = best rank-``rank`` approximation of ``delta``."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (m,q) (q,) (q,n)
    q = S.shape[0]
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    k = min(rank, q)
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k] / scale
    return LoRAPair(A, B)


@register("flexlora")
class FlexLoRA(AggregationRule):
    """Weighted sum of full-size updates, SVD back to rank R."""

    name = "flexlora"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        p = data_weights(updates)
        out: Adapter = {}
        for name, g in global_adapter.items():
            delta = weighted_delta(updates, name, p, self.options)
            f = svd_factors(delta, max_rank, self.options.scale(max_rank))
            out[name] = LoRAPair(f.A.to(g.A.dtype), f.B.to(g.B.dtype))
        return AggregationResult(out)

    def downlink(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Adapter:
        """Rank-r SVD truncation: the prefix of (U S, V^T) rescaled from s(R) to s(r)."""
        out: Adapter = {}
        for name, pair in global_adapter.items():
            ratio = self.options.scale(pair.rank) / self.options.scale(rank)
            out[name] = LoRAPair(pair.A[:rank].clone(), pair.B[:, :rank] * ratio)
        return out
