"""HetLoRA: zero-padding and sparsity-weighted aggregation.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024. Each client's factors are zero-padded to R and averaged with weights

    p_k = ||dW_k||_F / sum_j ||dW_j||_F,   dW_k = s(r_k) B_k A_k   (per module),

so clients whose update carries more energy (less sparse) weigh more. Clients receive the
truncation of the global factors to their rank; their local rank self-pruning lives in
``prelort.training.hetlora``. Rank rows no client of the round holds become zero (the
zero padding), as in the paper.
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
)


def sparsity_weights(updates: Sequence[ClientUpdate], name: str, scale: list[float]) -> torch.Tensor:
    """p_k proportional to ||s_k B_k A_k||_F for one module (data weights if all are zero)."""
    norms = torch.stack(
        [
            torch.linalg.matrix_norm(u.adapter[name].B.double() @ u.adapter[name].A.double()) * s
            for u, s in zip(updates, scale, strict=True)
        ]
    )
    total = norms.sum()
    if not torch.isfinite(total) or total <= 0:
        return data_weights(updates)
    return norms / total


@register("hetlora")
class HetLoRA(AggregationRule):
    """Sparsity-weighted average of zero-padded client factors."""

    name = "hetlora"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        scale = [self.options.scale(u.rank) for u in updates]
        out: Adapter = {}
        info: dict[str, list[float]] = {}
        for name, g in global_adapter.items():
            p = sparsity_weights(updates, name, scale)
            info[name] = p.tolist()
            A = torch.zeros(g.A.shape, dtype=torch.float64)
            B = torch.zeros(g.B.shape, dtype=torch.float64)
            for w, u in zip(p.tolist(), updates, strict=True):
                padded = u.adapter[name].pad(max_rank)
                A += w * padded.A.double()
                B += w * padded.B.double()
            out[name] = LoRAPair(A.to(g.A.dtype), B.to(g.B.dtype))
        return AggregationResult(out, info=info)
