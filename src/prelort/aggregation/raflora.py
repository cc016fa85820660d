"""raFLoRA: rank-partitioned aggregation on top of an SVD-based allocation (arXiv 2602.13486).

Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity", arXiv:2602.13486 (v2, May 2026). **What could be read**: the abstract and the
table of contents of v2 (arxiv.org/html/2602.13486, as stored at
fast.hugflare.com/papers/2602.13486.md), the abstract and the start of §1 of v1
(arxiv.org/html/2602.13486v1), and a third-party summary (pith.science/p/2602.13486). The body
of §3 (Preliminaries), §4 (Problem Analysis), §5 (raFLoRA Method) and Appendix A (the proof of
rank collapse) could **not** be read, so no equation numbers are cited here, and the formulas
below are our reading of the abstract: "decomposes local updates into rank partitions and then
aggregates each partition weighted by its effective client contributions", on top of the "SVD-
based allocation" whose rank-agnostic weights make "the energy of the global update
concentrate in the minimum shared rank ... at a geometric rate over rounds". No code by the
authors for raFLoRA was found; their earlier heterogeneous-FedLoRA code (github.com/fei407/FedFM,
``detection/src/hetero.py``, method ``svd``) implements that SVD-based allocation exactly as
FlexLoRA does here (data-weighted sum of s(r_k) B_k A_k, SVD, rank-r truncation, B divided by
s(r)), which we take as the baseline the paper's §3-§4 analyse.

**Rank partitions.** With the round's distinct client ranks l_1 < ... < l_m (l_0 = 0),
partition j is the rank dimensions [l_{j-1}, l_j), and a client update splits exactly (no cross
terms) as

    dW_k = s(r_k) B_k A_k = sum_{j: l_j <= r_k} dW_k^(j),   dW_k^(j) = s(r_k) B_k[:, P_j] A_k[P_j].

**Partition-wise aggregation.** Partition j is averaged over its contributors
C_j = {k : r_k >= l_j} only, weighted by their data sizes:

    dW = sum_j sum_{k in C_j} (n_k / sum_{i in C_j} n_i) dW_k^(j).

(Why this prevents collapse, our one-line version of the abstract's claim: FlexLoRA's
rank-agnostic weights p_k = n_k / N give partition j the total weight
rho_j = sum_{k in C_j} n_k / N < 1 for j > 1, so a component that clients return roughly
unchanged is multiplied by rho_j every round, rho_j^t over t rounds; here its weights sum to 1.)
``info["owner_share"]`` reports rho_j per partition and ``info["levels"]`` the l_j.

**SVD-based allocation** (FlexLoRA's, docs/design.md §4.4): dW = U S V^T; the global adapter
keeps the rank-R truncation and a rank-r client receives the rank-r truncation
A = V^T[:r], B = U[:, :r] S[:r] / s(r), the best rank-r approximation of dW (downlink inherited).

**Deviations and inferences.** (1) The contribution weights are data sizes n_k, renormalised
over C_j; the summary reads "the number of clients that provide it" (the same with equal n_k);
the exact weights of §5 could not be checked. (2) Partitions are the round's distinct ranks;
splitting at further (configured) rank levels changes nothing, since C_j is constant between
two consecutive client ranks. (3) A partition no client of the round holds ([r_max, R) when no
rank-R client takes part) keeps the previous global adapter's components
s(R) B_g[:, P] A_g[P] (the same choice as the segment rule, docs/design.md §4.2), so
non-contributors do not shrink it to zero; we assume the paper (full participation, every rank
present) never meets this case. (4) The aggregated updates are the clients' trained adapters
(products), as in the SVD-based allocation above, not differences from what they were sent.

**How it differs from RB-LoRA** (``rb_lora.py``): RB-LoRA (Ha et al., EACL 2026) weights each
rank-one component i by n_k / sum_{j: r_j > i} n_j ("rank rarity"), motivated by balancing
rare columns; raFLoRA weights rank partitions between rank levels by their contributors,
motivated by the rank-collapse analysis. In our readings of both papers (neither method
section could be read in full) the two aggregates **coincide whenever every partition has a
contributor**, because RB-LoRA's weight is constant on each partition; they differ only on
partitions nobody in the round holds, which RB-LoRA sets to zero and raFLoRA keeps (3).

**What a rank-r client holds**: its rank-r SVD truncation of dW, family ``rank-limited``.
Bytes: 4 r_k (in + out) per module each way; the server forms one out x in matrix per module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import AggregationResult, ClientUpdate, check_updates, register
from prelort.aggregation.flexlora import FlexLoRA, svd_factors


def rank_partitions(updates: Sequence[ClientUpdate], max_rank: int) -> list[tuple[int, int]]:
    """Partitions [l_{j-1}, l_j) at the round's distinct ranks, plus [r_max, R) if r_max < R."""
    levels = sorted({u.rank for u in updates})
    if levels[-1] < max_rank:
        levels.append(max_rank)
    return list(zip([0, *levels[:-1]], levels, strict=True))


@register("raflora")
class RaFLoRA(FlexLoRA):
    """Partition-wise average over each partition's contributors, SVD back to rank R."""

    name = "raflora"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        parts = rank_partitions(updates, max_rank)
        total = float(sum(u.num_examples for u in updates))
        owner_share: list[float] = []
        for _, hi in parts:
            owned = sum(u.num_examples for u in updates if u.rank >= hi)
            owner_share.append(owned / total)
        out: Adapter = {}
        for name, g in global_adapter.items():
            delta = torch.zeros(g.B.shape[0], g.A.shape[1], dtype=torch.float64)
            for lo, hi in parts:
                owners = [u for u in updates if u.rank >= hi]
                if not owners:  # nobody holds it this round: keep the global's components
                    keep = LoRAPair(g.A[lo:hi], g.B[:, lo:hi])
                    delta += keep.delta(self.options.scale(max_rank))
                    continue
                n_j = float(sum(u.num_examples for u in owners))
                for u in owners:
                    pair = u.adapter[name]
                    piece = LoRAPair(pair.A[lo:hi], pair.B[:, lo:hi])
                    delta += piece.delta(u.num_examples / n_j * self.options.scale(u.rank))
            f = svd_factors(delta, max_rank, self.options.scale(max_rank))
            out[name] = LoRAPair(f.A.to(g.A.dtype), f.B.to(g.B.dtype))
        info = {"levels": [float(hi) for _, hi in parts], "owner_share": owner_share}
        return AggregationResult(out, info=info)
