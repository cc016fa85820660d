"""Segment-wise aggregation (RBLA / RB-LoRA rule; PreLort's server step).

Segment j holds rank rows [l_{j-1}, l_j); with C_j = {k : r_k >= l_j} and n_k the data sizes,

    A_new[i]    = sum_{k in C_j} n_k A_k[i]    / sum_{k in C_j} n_k,
    B_new[:, i] = sum_{k in C_j} n_k B_k[:, i] / sum_{k in C_j} n_k,

and a segment no client of this round owns keeps its previous global value. Since every
client rank is a level, per-row ownership (r_k > i) gives exactly the per-segment sets C_j.
Only weighted sums and per-row weight sums are needed, so it is secure-aggregation friendly.
See docs/design.md §4.2 and Chen et al., "RBLA: Rank-Based-LoRA-Aggregation" (arXiv 2408.08699, 2024).
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
    register,
)


def segment_average(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> Adapter:
    """Per-rank-row weighted average over the clients owning the row; unowned rows kept."""
    max_rank = check_updates(global_adapter, updates)
    out: Adapter = {}
    for name, g in global_adapter.items():
        num_A = torch.zeros(g.A.shape, dtype=torch.float64)  # (R, in)
        num_B = torch.zeros(g.B.shape, dtype=torch.float64)  # (out, R)
        den = torch.zeros(max_rank, dtype=torch.float64)  # (R,)
        for u in updates:
            r, n = u.rank, float(u.num_examples)
            pair = u.adapter[name]
            num_A[:r] += n * pair.A.double()
            num_B[:, :r] += n * pair.B.double()
            den[:r] += n
        owned = den > 0
        safe = torch.where(owned, den, torch.ones_like(den))
        A = torch.where(owned[:, None], num_A / safe[:, None], g.A.double())
        B = torch.where(owned[None, :], num_B / safe[None, :], g.B.double())
        out[name] = LoRAPair(A.to(g.A.dtype), B.to(g.B.dtype))
    return out


@register("segment")
class Segment(AggregationRule):
    """Segment-wise averaging with plain local training (the key ablation of PreLort)."""

    name = "segment"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        return AggregationResult(segment_average(global_adapter, updates))
