"""HetLoRA's local rank self-pruning (Cho et al., EMNLP 2024, arXiv 2401.06432, §3).

The paper (§3, "local training with rank self-pruning"): client k of rank r_k solves the
regularised local problem

    min  f_k(W_k) + lambda * ||B_k[:, gamma r_k : r_k]||_F * ||A_k[gamma r_k : r_k, :]||_F

where gamma < 1 is the decay factor: the penalty covers the last (1 - gamma) r_k rank
dimensions of the client's LoRA factors. If, after local training, this norm product is
smaller than it was when the round began, the client prunes those dimensions: it sends back,
and keeps for later rounds, the factors truncated to rank gamma r_k; otherwise it keeps r_k.
The server then zero-pads and aggregates (``prelort.aggregation.hetlora``).

What we do, and where it differs:

* Pruning amount: the paper writes gamma r_k without saying how it is rounded. We use
  p = floor(gamma r) (``prune_point``), as public re-implementations do. It is the only
  rounding under which the mechanism acts for small ranks: for every r < 1 / (1 - gamma)
  (r < 100 at the default gamma = 0.99) ``ceil`` or ``round`` give p = r, an empty tail, no
  penalty and no pruning ever. So at gamma = 0.99 a successful prune removes exactly one
  rank dimension (r -> r - 1). That is the paper's own granularity, not a bug. A smaller gamma
  prunes faster (gamma = 0.75: 16 -> 12 -> 9 -> ...). A small tolerance (1e-9) is added before
  flooring, so a decimal gamma gives the hand-computed value (0.57 * 100 -> 57, not 56).
* Floor (our addition; the paper has none): a client never prunes below ``min_rank`` (the
  config's ``hetlora.min_rank``, by default the smallest rank level of the run) nor below 1.
  When floor(gamma r) is below the floor, the prune stops at the floor. A client already at or
  below the floor is never pruned.
* Floor-aware tail (optional, ``min_rank`` keyword of ``tail_norm`` / ``make_regulariser``):
  the tail then starts at max(floor(gamma r), floor). The penalty and the prune decision then
  look at exactly the rows that a prune would remove, and a client at the floor is not
  penalised, because it cannot prune. The default ``min_rank=0`` is the paper's tail.
* The paper writes the term for one LoRA module and gives a client one rank for all modules.
  We sum the norm products over the client's modules and take one prune decision per client.
"""

from __future__ import annotations

import math

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.training.local import Regulariser

_FLOOR_TOL = 1e-9
"""Added to gamma * r before flooring, so a decimal gamma floors as it does by hand."""


def prune_point(rank: int, gamma: float, min_rank: int = 0) -> int:
    """The first tail rank dimension p: the rank a successful prune leaves.

    p = max(floor(gamma r), min_rank), capped at ``rank`` (an empty tail). With the default
    ``min_rank=0`` this is the paper's gamma r_k rounded down, at most r - 1 (§3; see the
    module docstring for why floor).
    """
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    p = min(math.floor(gamma * rank + _FLOOR_TOL), rank - 1)
    return min(max(p, min_rank, 0), rank)


def tail_norm(nested: NestedLoRA, rank: int, gamma: float, *, min_rank: int = 0) -> torch.Tensor:
    """sum over modules of ||A[p:r]||_F * ||B[:, p:r]||_F, p = ``prune_point`` (differentiable).

    This is the paper's regulariser without lambda (§3). An empty tail gives 0.
    """
    p = prune_point(rank, gamma, min_rank)
    terms = []
    for name in nested.layers:
        A, B = nested.factor(name)
        terms.append(torch.linalg.vector_norm(A[p:rank]) * torch.linalg.vector_norm(B[:, p:rank]))
    return torch.stack(terms).sum()


def make_regulariser(lam: float, gamma: float, *, min_rank: int = 0) -> Regulariser:
    """The regulariser closure lambda * tail_norm for ``train_local`` (paper §3)."""

    def regulariser(nested: NestedLoRA, rank: int) -> torch.Tensor:
        return lam * tail_norm(nested, rank, gamma, min_rank=min_rank)

    return regulariser


def pruned_rank(rank: int, before: float, after: float, gamma: float, min_rank: int | None) -> int:
    """The client's rank after self-pruning (paper §3, plus our floor).

    Returns max(floor(gamma r), min_rank, 1) if that is below ``rank`` and the tail norm fell
    during local training (``after < before``; a NaN never prunes). Otherwise returns ``rank``
    unchanged. The result is never below the floor max(min_rank, 1) unless ``rank`` itself is,
    and pruning never raises a rank. ``min_rank`` is the resolved floor: ``config_from_dict``
    turns ``hetlora.min_rank = None`` into the smallest rank level. An unresolved None is an
    error.
    """
    if min_rank is None:
        raise ValueError("pruned_rank needs the resolved floor: hetlora.min_rank is None")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    target = prune_point(rank, gamma, max(min_rank, 1))
    if after < before and target < rank:
        return target
    return rank


class SelfPruning:
    """HetLoRA's part in one client's local training (§3): the tail regulariser, and the rank
    the client keeps after training (``pruned_rank`` of the tail norms before and after)."""

    def __init__(self, nested: NestedLoRA, rank: int, lam: float, gamma: float, min_rank: int) -> None:
        self.nested, self.rank, self.gamma, self.floor = nested, rank, gamma, min_rank
        self.regulariser: Regulariser | None = make_regulariser(lam, gamma, min_rank=min_rank)
        self.before = float(tail_norm(nested, rank, gamma, min_rank=min_rank).detach())

    def rank_after(self) -> int:
        after = float(tail_norm(self.nested, self.rank, self.gamma, min_rank=self.floor).detach())
        return pruned_rank(self.rank, self.before, after, self.gamma, self.floor)
