"""Checks every client update must pass before it may reach the global adapter."""

from __future__ import annotations

import math

import torch

from prelort.adapters.state import Adapter
from prelort.aggregation.base import ClientUpdate


def update_norm(adapter: Adapter) -> float:
    """sqrt(sum over modules of ||A||_F^2 + ||B||_F^2)."""
    total = 0.0
    for pair in adapter.values():
        total += float(pair.A.double().pow(2).sum() + pair.B.double().pow(2).sum())
    return math.sqrt(total)


def rejection_reason(
    update: ClientUpdate, *, sent: Adapter, capacity: int, max_norm: float | None = None
) -> str | None:
    """Why ``update`` must be rejected, or None if it is acceptable.

    The update must name exactly the modules it was sent, have rank <= the rank it was sent
    (HetLoRA may prune) and <= the client's capacity, carry factors of exactly that rank and
    the module's shapes, contain only finite numbers, report a positive data size, and have a
    norm within ``max_norm`` when a bound is set.
    """
    sent_rank = next(iter(sent.values())).rank
    if update.rank > capacity:
        return f"rank {update.rank} above the client's capacity {capacity}"
    if update.rank > sent_rank or update.rank <= 0:
        return f"rank {update.rank} not in 1..{sent_rank} (the rank it was sent)"
    if set(update.adapter) != set(sent):
        return "module names differ from those it was sent"
    if update.num_examples <= 0:
        return f"num_examples = {update.num_examples} is not positive"
    for name, pair in update.adapter.items():
        ref = sent[name]
        want_a = (update.rank, ref.A.shape[1])
        want_b = (ref.B.shape[0], update.rank)
        if tuple(pair.A.shape) != want_a or tuple(pair.B.shape) != want_b:
            return (
                f"module {name}: shapes A{tuple(pair.A.shape)} B{tuple(pair.B.shape)}, "
                f"expected A{want_a} B{want_b}"
            )
        if not (torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()):
            return f"module {name}: NaN or Inf values"
    if max_norm is not None and max_norm > 0:
        norm = update_norm(update.adapter)
        if norm > max_norm:
            return f"update norm {norm:.4g} above the bound {max_norm:.4g}"
    return None
