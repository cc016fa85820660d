"""Importance order of rank dimensions: re-order a LoRA adapter so every prefix is optimal.

Segment-wise averaging (``segment.py``) orders rank dimensions by *who owns them*: dimension
i is wherever it was in the clients' factors. Its rank-r prefix is therefore not the best
rank-r part of its own product B A (issue #18 measured 1.2-2x the Eckart-Young error). This
module rotates the rank space of each module (docs/design.md §4.2b):

    B = Q_B R_B,  A^T = Q_A R_A          (thin QR; Q_B: out x k_B, Q_A: in x k_A)
    R_B R_A^T = U S V^T                  (SVD of the small k_B x k_A core)
    split "b":         A' = (Q_A V)^T = V^T Q_A^T,       B' = Q_B U S,
    split "balanced":  A' = S^{1/2} V^T Q_A^T,           B' = Q_B U S^{1/2},

so B' A' = Q_B U S V^T Q_A^T = B A (the full product is unchanged) and, by Eckart-Young
(Eckart and Young 1936), B'[:, :r] A'[:r] = U_r S_r V_r^T is the best rank-r approximation of
B A in Frobenius and spectral norm for every r. The cost is O((in + out) R^2 + R^3) per module:
no dense out x in matrix is formed, unlike FlexLoRA or RB-LoRA. The two splits give the same
product and prefixes and differ only in how the next round trains: ``b`` (issue #18's
formula) makes A's rows orthonormal and puts the whole spectrum in B; ``balanced`` gives
dimension i equal norms ||a_i|| = ||b_i|| = sqrt(s_i), the balance that gradient flow on a
factorisation preserves (Du, Hu and Lee, NeurIPS 2018, Thm. 2.1: A A^T - B^T B is invariant).
A dimension with s_i = 0 keeps its orthonormal A row (so it stays trainable) and B' = 0.
It needs only the aggregated factors, so it is post-processing of the segment-wise sums and
runs under secure aggregation and differential privacy unchanged.

Where the product has rank q < R because in < R or out < R, dimensions q..R-1 get B' = 0 and
keep the old rows of A (any A row gives the same product there; a non-zero one keeps the
dimension trainable, as LoRA's initialisation B = 0, A random does).

The scale s(r) is not touched: with ``fixed`` scaling the rank-r model s B'_r A'_r is the best
rank-r approximation of the full model's change; with ``per_rank`` / ``rslora`` it is that
approximation times s(r) / s(R), the scaling's own convention.
"""

from __future__ import annotations

from typing import Literal

import torch

from prelort.adapters.state import Adapter, LoRAPair

Split = Literal["b", "balanced"]


def importance_order_pair(pair: LoRAPair, split: Split = "balanced") -> LoRAPair:
    """(A', B') with B' A' = B A and every prefix the best rank-r approximation (float64 inside)."""
    A, B = pair.A.double(), pair.B.double()  # (R, in), (out, R)
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")  # (out, k_B), (k_B, R)
    Q_A, R_A = torch.linalg.qr(A.T, mode="reduced")  # (in, k_A), (k_A, R)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # (k_B, q), (q,), (q, k_A)
    q = S.shape[0]
    A_new = A.clone()
    B_new = torch.zeros_like(B)
    if split == "balanced":
        root = S.sqrt()
        c = torch.where(S > 0, root, torch.ones_like(S))  # row norm of A'; B' gets S / c
        A_new[:q] = c[:, None] * (Vh @ Q_A.T)
        B_new[:, :q] = Q_B @ (U * torch.where(S > 0, root, torch.zeros_like(S)))
    else:
        A_new[:q] = Vh @ Q_A.T
        B_new[:, :q] = Q_B @ (U * S)
    return LoRAPair(A_new.to(pair.A.dtype), B_new.to(pair.B.dtype))


def importance_order(adapter: Adapter, split: Split = "balanced") -> Adapter:
    """``importance_order_pair`` applied to every module of ``adapter``."""
    return {name: importance_order_pair(pair, split) for name, pair in adapter.items()}
