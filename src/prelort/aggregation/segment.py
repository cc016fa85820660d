"""Segment-wise aggregation (RBLA / RB-LoRA rule; PreLort's server step).

Segment j holds rank rows [l_{j-1}, l_j); with C_j = {k : r_k >= l_j} and n_k the data sizes,

    A_new[i]    = sum_{k in C_j} n_k A_k[i]    / sum_{k in C_j} n_k,
    B_new[:, i] = sum_{k in C_j} n_k B_k[:, i] / sum_{k in C_j} n_k,

and a segment no client of this round owns keeps its previous global value. Since every
client rank is a level, per-row ownership (r_k > i) gives exactly the per-segment sets C_j.
Only weighted sums and per-row weight sums are needed, so it is secure-aggregation friendly.

``options.order`` (``importance.py``, docs/design.md §4.2b): ``round`` re-orders the averaged
adapter by importance after every aggregation (the full product unchanged, every prefix the
best rank-r approximation of it); ``export`` keeps the averaged state and applies the order
only to what evaluation and export take (``downlink`` without a client).
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
from prelort.aggregation.importance import importance_order


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


class SegmentWise(AggregationRule):
    """Segment-wise averaging in ``options.order`` (shared by ``segment`` and ``prelort``)."""

    sum_form = True

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        return AggregationResult(self.finish_sums(segment_average(global_adapter, updates)))

    def finish_sums(self, adapter: Adapter) -> Adapter:
        """Importance order after the average when ``order = "round"``."""
        if self.options.order != "round":
            return adapter
        return importance_order(adapter, self.options.split)

    def downlink(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Adapter:
        """The rank-r prefix; without a client (evaluation, export) under ``order = "export"``
        the prefix of the importance-ordered adapter."""
        if client_id is None and self.options.order == "export":
            global_adapter = importance_order(global_adapter, self.options.split)
        return super().downlink(global_adapter, rank, client_id=client_id, round_=round_)


@register("segment")
class Segment(SegmentWise):
    """Segment-wise averaging with plain local training (the key ablation of PreLort)."""

    name = "segment"
