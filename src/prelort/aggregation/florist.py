"""FLoRIST: exact stacking, SVD in the stacked space, singular-value thresholding (MLSys 2026).

Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
Fine-Tuning of Large Language Models", MLSys 2026 (arXiv 2506.09199). Sources read for this
file: the paper's abstract and public summaries of its method section (weighted stacking,
SVD of the stacks in an intermediate space, tunable singular-value thresholding). The full
text, hence its section and equation numbers, and any code of the authors could not be
obtained here, so nothing is checked against them; "method: ..." names the step.

**Aggregation** (method: "noise-free aggregation via weighted stacking", after FLoRA). Per
module, over the round's valid updates with p_k = n_k / sum_j n_j,

    B_st = [s(r_1) B_1, ..., s(r_K) B_K]   (out x r),   A_st = [p_1 A_1; ...; p_K A_K]   (r x in),

r = sum_k r_k, so that B_st A_st = sum_k p_k s(r_k) B_k A_k exactly (the LoRA scale s(r_k) of
each client is folded into B, as in ``flora``; the paper's B_k A_k has none).

**Decomposition in the intermediate space** (method: "efficient SVD"). Instead of forming
the out x in matrix, SVD the two stacks separately, B_st = U_B S_B V_B^T and
A_st = U_A S_A V_A^T, then the small matrix M = S_B V_B^T U_A S_A = U_M S V_M^T, so that

    B_st A_st = (U_B U_M) S (V_M^T V_A^T),

an exact SVD of the aggregated update computed at O((in + out) r^2) cost.

**Singular-value thresholding** (method: the tunable threshold tau). Keep the smallest p with

    sum_{i<p} sigma_i^2 >= tau * sum_i sigma_i^2,

per module (our reading: each layer its own p), i.e. the leading singular directions holding
a share tau of the update's energy (squared Frobenius norm). Reading of "energy": squared
singular values (we could not check whether the paper cumulates sigma_i or sigma_i^2). tau
is ``[florist] energy_threshold`` (``RuleOptions.energy_threshold`` outside a run; default
0.9: our choice; the paper treats tau as a tunable knob trading accuracy for communication).
The global
adapters are B_g = U_B U_M[:, :p] S[:p] (out x p) and A_g = V_M^T[:p] V_A^T (p x in), shared
by all clients whatever their rank; tau = 1 keeps every nonzero direction and reproduces
the weighted sum exactly.

**Clients** (as FLoRA, which FLoRIST extends): a rank-p global pair cannot be a rank-r_k
client's adapter when p != r_k, so every client merges B_g A_g into its frozen weights and
starts the round from a fresh rank-r_k adapter (A random from the per-round rule generator,
B = 0). Here the merged deltas accumulate in ``base_delta`` (W = W0 + sum_t B_g^t A_g^t),
exactly like ``flora``. Our reading of how heterogeneous clients continue; the paper's
algorithm box could not be checked.

**What a rank-r client holds**: the merged model W0 + sum_t B_g^t A_g^t, i.e. its
thresholded factors merged into the base, the same at every level: family ``merged``; the
per-rank column is that merged model (the fresh adapter has B = 0).

**Bytes.** Upload: the client's rank-r_k factors, 4 r_k (in + out) per module. Download:
its fresh prefix (as ``flora``, counted though a client could draw it from the seed) plus the
thresholded pair, ``broadcast_bytes = 4 sum_modules p (in + out)``, instead of FLoRA's
4 (sum_k r_k)(in + out). On Flower the wire carries the dense accumulated delta (as for
``flora``, reported as ``wire_bytes_down``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, init_adapter
from prelort.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    MergingRule,
    check_updates,
    data_weights,
    register,
)


def stacked_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, S, V^T) of ``B @ A`` from the SVDs of B (out x r) and A (r x in) and of the small
    intermediate matrix, never forming the out x in product (float64)."""
    Ub, Sb, Vbh = torch.linalg.svd(B.double(), full_matrices=False)  # (out,q1) (q1,) (q1,r)
    Ua, Sa, Vah = torch.linalg.svd(A.double(), full_matrices=False)  # (r,q2) (q2,) (q2,in)
    M = (Sb[:, None] * Vbh) @ (Ua * Sa[None, :])  # (q1, q2)
    Um, S, Vmh = torch.linalg.svd(M, full_matrices=False)
    return Ub @ Um, S, Vmh @ Vah


def energy_rank(S: torch.Tensor, tau: float) -> int:
    """The smallest p with sum_{i<p} S_i^2 >= tau * sum_i S_i^2 (S sorted descending); 0 for
    an all-zero S."""
    energy = torch.cumsum(S.double() ** 2, 0)
    if energy.numel() == 0 or float(energy[-1]) <= 0.0:
        return 0
    reached = energy >= tau * energy[-1]
    return int(torch.nonzero(reached)[0]) + 1


@register("florist")
class FLoRIST(MergingRule):
    """Exact stacking, stacked-space SVD, energy thresholding; merged, fresh adapters."""

    name = "florist"
    config_section = "florist"

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        tau = self.options.section.energy_threshold if self.options.section else self.options.energy_threshold
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"FLoRIST energy threshold tau = {tau} must be in (0, 1]")
        p = data_weights(updates).tolist()
        scale = [self.options.scale(u.rank) for u in updates]
        base_delta: dict[str, torch.Tensor] = {}
        broadcast = 0
        info: dict[str, list[float]] = {}
        for name, g in global_adapter.items():
            A_st = torch.cat([u.adapter[name].A.double() * w for u, w in zip(updates, p, strict=True)])
            B_st = torch.cat([u.adapter[name].B.double() * s for u, s in zip(updates, scale, strict=True)], 1)
            U, S, Vh = stacked_svd(B_st, A_st)
            keep = energy_rank(S, tau)
            B_g, A_g = U[:, :keep] * S[:keep], Vh[:keep]  # the shared global pair, rank p = keep
            base_delta[name] = (B_g @ A_g).float()
            broadcast += 4 * keep * (g.B.shape[0] + g.A.shape[1])
            total = float((S.double() ** 2).sum())
            kept = float((S[:keep].double() ** 2).sum()) / total if total > 0 else 1.0
            info[name] = [float(keep), kept]
        generator = self.options.generator or torch.Generator().manual_seed(0)
        shapes = {name: (g.B.shape[0], g.A.shape[1]) for name, g in global_adapter.items()}
        fresh = init_adapter(shapes, max_rank, generator)
        return AggregationResult(fresh, base_delta=base_delta, broadcast_bytes=broadcast, info=info)
