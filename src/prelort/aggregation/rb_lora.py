"""RB-LoRA: rank-wise decomposition with rank-balanced weights, SVD projection (EACL 2026).

Ha, Oh and Jeon, "RB-LoRA: Rank-Balanced Aggregation for Low-Rank Adaptation with Federated
Fine-Tuning", Findings of EACL 2026, pp. 1737-1746 (code: seonha01/rb-lora). Sources read for
this file: the paper's abstract and project page (its framework section) and the authors'
repository (``aggregation.py``, ``rb_lora.py``, ``train.py``, ``method_registry.py``); the full
paper text was not available here, so the equations below are our reading of those sources.

**Rank-wise decomposition.** A client update is a sum of rank-one components,

    dW_k = s(r_k) B_k A_k = s(r_k) sum_{i<r_k} b_{k,i} a_{k,i}^T,

aligned to a common rank R by zero padding (component i exists for the clients with r_k > i).

**Rank-balanced weights.** The aggregate is a weighted sum of the components with the
factorised weights gamma_i(k) = alpha_k * beta_i (project page: "data proportionality" times
"rank rarity"):

    alpha_k = n_k / N,   N = sum_k n_k,
    beta_i  = N / D_i,   D_i = sum_{k: r_k > i} n_k     (0 when no client has component i),
    dW = sum_k sum_{i<r_k} alpha_k beta_i s(r_k) b_{k,i} a_{k,i}^T.

beta_i is exactly the authors' ``compute_column_weights_from_ranks`` (total data size over
the data size of the clients holding column i), so gamma_i(k) = n_k / D_i: each rank-one
component is averaged over the clients that hold it, weighted by their data; a component
only large-rank clients have is not shrunk by the small-rank clients' zeros. Our reading: the
weights apply to the rank-one *components* (no cross terms between clients), which is what
"decomposes each update into rank-wise components ... sum of rank-one matrices" describes;
weighting the factors A and B separately would instead give segment-wise averaging of the
factors (``segment``) plus an SVD. N and D_i run over the round's valid updates (the
authors' code uses every client's size because all clients take part in every round).

**Projection** (authors' ``distribute_lora_weights_with_svd``). dW = U S V^T; the global
adapter keeps the rank-R truncation and a rank-r client receives the rank-r truncation
A = V^T[:r], B = U[:, :r] S[:r] / s(r) (the authors divide by ``alpha / r``, PEFT's s(r)), so
s(r) B A is the best rank-r approximation of dW, as FlexLoRA's downlink (inherited).

Deviation from the authors' released code: there the ``RB-LoRA`` method aggregates with the
"Weighted HETLoRA" rule (data-weighted average of the zero-padded factors) and never applies
``compute_column_weights_from_ranks`` (imported, unused), so the released run is FedAvg of
padded factors followed by the SVD projection. We follow the paper's described method (the
rank-balanced weights) rather than that code path.

**What a rank-r client holds**: its rank-r SVD truncation of dW, family ``rank-limited``;
column r of the per-rank evaluation is that truncation. Bytes: 4 r_k (in + out) per module
each way; the server forms one out x in matrix per module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import AggregationResult, ClientUpdate, check_updates, register
from prelort.aggregation.flexlora import FlexLoRA, svd_factors


def rank_balance(updates: Sequence[ClientUpdate], max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta): alpha_k = n_k / N (K,) and beta_i = N / sum_{j: r_j > i} n_j (R,), 0 where
    no update holds component i."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    holders = torch.zeros(max_rank, dtype=torch.float64)  # D_i
    for u, n_k in zip(updates, n.tolist(), strict=True):
        holders[: u.rank] += n_k
    total = n.sum()
    beta = torch.where(holders > 0, total / torch.where(holders > 0, holders, 1.0), 0.0)
    return n / total, beta


@register("rb-lora")
class RBLoRA(FlexLoRA):
    """Rank-balanced weighted sum of rank-one components, SVD back to rank R (downlink: SVD)."""

    name = "rb-lora"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        alpha, beta = rank_balance(updates, max_rank)
        out: Adapter = {}
        for name, g in global_adapter.items():
            delta = torch.zeros(g.B.shape[0], g.A.shape[1], dtype=torch.float64)
            for a_k, u in zip(alpha.tolist(), updates, strict=True):
                pair = u.adapter[name]
                gamma = a_k * beta[: u.rank] * self.options.scale(u.rank)  # gamma_i(k) s(r_k), i < r_k
                delta += (pair.B.double() * gamma[None, :]) @ pair.A.double()
            f = svd_factors(delta, max_rank, self.options.scale(max_rank))
            out[name] = LoRAPair(f.A.to(g.A.dtype), f.B.to(g.B.dtype))
        return AggregationResult(out, info={"alpha": alpha.tolist(), "beta": beta.tolist()})
