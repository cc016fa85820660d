"""HetLoRA: zero-padding and sparsity-weighted aggregation (Cho et al., EMNLP 2024, §3).

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv 2401.06432), §3 and its Figure 2:

1. Zero-padding. Each client's factors (B_k, A_k) of rank r_k are padded with zeros to R.
2. Sparsity-weighted aggregation. The padded factors are averaged with the weights

       p_k = ||S_k||_F / Z,   S_k = dW_k = s(r_k) B_k A_k (per module),   Z = sum_j ||S_j||_F,

   so clients whose update carries more energy (is less sparse) weigh more. The weights do
   not depend on n_k.
3. Truncation. Clients receive the global factors truncated to their rank. Their local rank
   self-pruning lives in ``prelort.training.hetlora``.

Deviations: the paper's dW_k = B_k A_k has no LoRA scaling. We weigh the update that the client
actually applies, s(r_k) B_k A_k. This is the same whenever s does not depend on the rank
(fixed scaling), because a common factor cancels in p_k. If every update is zero, the weights
fall back to the data weights n_k / n (the paper's formula is 0/0 there).

Zero-padding collapse. Rank rows that no client of the round owns (rows r >= max_k r_k) come
out as A[r] = 0 and B[:, r] = 0, as in the paper. Such a row is a stationary point of local
training. With h = A x, the gradients of a loss L through B A are

    dL/dB[:, r] = sum over the batch of (dL/dy) h_r = 0,   because h_r = A[r] x = 0
    dL/dA[r]    = sum over the batch of (B[:, r]^T dL/dy) x^T = 0,   because B[:, r] = 0

The tail regulariser's subgradient at a zero tail is zero, and weight decay keeps zero at
zero. So no client ever moves that row again, and after one round without an owner the row
is dead for the rest of the run. A row where only one of the two factors is zero would
recover. Under zero-padding, both are zero. Self-pruning can leave rows unowned in the
same way (a pruned rank-R client no longer sends row R - 1); that is the paper's intended
effect. Sampling that misses a rank level would do it by accident, and dead rows also starve
the larger-rank clients of later rounds. This is why the benchmark configs use stratified
sampling (``run.sampling = "stratified"``), which puts every rank level in every round.
Rows owned by only some clients are also diluted: the owners' weights sum to less than 1. The
segment rule avoids that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    check_updates,
    data_weights,
    register,
)
from prelort.training.hetlora import SelfPruning


def sparsity_weights(updates: Sequence[ClientUpdate], name: str, scale: list[float]) -> torch.Tensor:
    """p_k proportional to ||s_k B_k A_k||_F for one module (data weights if all are zero)."""
    norms = torch.stack(
        [torch.linalg.matrix_norm(u.adapter[name].delta()) * s for u, s in zip(updates, scale, strict=True)]
    )
    total = norms.sum()
    if not torch.isfinite(total) or total <= 0:
        return data_weights(updates)
    return norms / total


@register("hetlora")
class HetLoRA(AggregationRule):
    """Sparsity-weighted average of zero-padded client factors (paper §3, Figure 2).

    Rows no client of the round owns become zero and stay zero for good; see the module
    docstring (use ``run.sampling = "stratified"``).
    """

    name = "hetlora"
    config_section = "hetlora"

    def local_hook(self, nested: NestedLoRA, rank: int) -> SelfPruning:
        """§3's local training: the tail regulariser, then self-pruning ([hetlora] options)."""
        h = self.options.section
        if h is None or h.min_rank is None:
            raise ValueError("hetlora needs its resolved [hetlora] options (RuleOptions.section)")
        return SelfPruning(nested, rank, h.lam, h.gamma, h.min_rank)

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
