"""HetLoRA's local rank self-pruning (Cho et al., EMNLP 2024, §3.2).

The local loss gets the regulariser  lambda * sum_modules ||A[p:r]||_F * ||B[:, p:r]||_F  with
p = floor(gamma * r), pushing the tail rank dimensions toward zero. After local training,
if the tail's norm product fell below its value at the start of the round, the client
prunes itself to rank p for the rest of the run (never below ``min_rank``).
"""

from __future__ import annotations

import math

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.training.local import Regulariser


def prune_point(rank: int, gamma: float) -> int:
    """p = floor(gamma * r): the first tail rank dimension."""
    return max(math.floor(gamma * rank), 0)


def tail_norm(nested: NestedLoRA, rank: int, gamma: float) -> torch.Tensor:
    """sum over modules of ||A[p:r]||_F * ||B[:, p:r]||_F (differentiable)."""
    p = prune_point(rank, gamma)
    terms = []
    for name in nested.layers:
        A, B = nested.factor(name)
        terms.append(torch.linalg.vector_norm(A[p:rank]) * torch.linalg.vector_norm(B[:, p:rank]))
    return torch.stack(terms).sum()


def make_regulariser(lam: float, gamma: float) -> Regulariser:
    """The regulariser closure lambda * tail_norm for ``train_local``."""

    def regulariser(nested: NestedLoRA, rank: int) -> torch.Tensor:
        return lam * tail_norm(nested, rank, gamma)

    return regulariser


def pruned_rank(rank: int, before: float, after: float, gamma: float, min_rank: int) -> int:
    """The client's rank after self-pruning: p if the tail norm decreased, else r."""
    p = prune_point(rank, gamma)
    if after < before and p >= min_rank and p < rank:
        return p
    return rank
