"""One client's local update: plain LoRA or prefix-nested training (docs/design.md §2).

Client k with capacity r_k trains on levels L_k = {l in L : l <= r_k}:
- ``plain``: loss at truncation r_k only;
- ``all``: loss = sum_{l in L_k} c_l loss(model at l) / sum c_l, |L_k| passes per step;
- ``sample``: each step draws one level l ~ c (the own rank r_k with weight ``own_weight``)
  and trains that truncation only (DyLoRA-style, one pass per step).
Level weights: the own rank gets ``own_weight``, the lower levels share ``1 - own_weight``
equally (``own_weight = None`` gives equal weights, ``"geometric"`` c_{l_j} proportional to
2^j). Every optimiser step is masked to the largest truncation that produced the gradient
(``MaskedAdamW``). ``factors`` restricts training to B (A frozen, FFA-LoRA) or to A.
A pass is one forward + backward; ``TrainStats`` counts passes and examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prelort.adapters.nested import NestedLoRA
from prelort.training.optim import MaskedAdamW

TrainMode = Literal["plain", "all", "sample"]
Factors = Literal["both", "A", "B"]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
Regulariser = Callable[[NestedLoRA, int], torch.Tensor]


@dataclass(frozen=True)
class LocalTrainConfig:
    """Local optimisation settings for one client round."""

    steps: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    mode: TrainMode = "plain"
    own_weight: float | Literal["geometric"] | None = 0.7
    max_grad_norm: float | None = None
    factors: Factors = "both"
    """Which factors are trained: both, only A (B frozen) or only B (A frozen)."""


@dataclass(frozen=True)
class TrainStats:
    """Mean training loss, per level trained, optimiser steps, passes and examples processed."""

    loss: float
    steps: int
    loss_per_level: dict[int, float]
    passes: int = 0
    """Forward/backward passes (``all`` mode: |L_k| per step)."""
    examples: int = 0
    """Training examples drawn (batch sizes summed over steps)."""


def level_distribution(
    rank: int, levels: Sequence[int], own_weight: float | Literal["geometric"] | None
) -> dict[int, float]:
    """Normalised weights c_l over L_k = {l in levels : l <= rank} (docs/design.md §2).

    float w: c_{r_k} = w, the others (1 - w) / (|L_k| - 1); None: 1 / |L_k|;
    ``"geometric"``: c_{l_j} = 2^j / sum_i 2^i (j = 0 for the smallest level).
    """
    lk = [lv for lv in levels if lv <= rank]
    if rank not in lk:
        lk.append(rank)
    lk = sorted(set(lk))
    if len(lk) == 1:
        return {rank: 1.0}
    if own_weight is None:
        return {lv: 1.0 / len(lk) for lv in lk}
    if own_weight == "geometric":
        total = float(2 ** len(lk) - 1)
        return {lv: 2.0**j / total for j, lv in enumerate(lk)}
    rest = (1.0 - own_weight) / (len(lk) - 1)
    return {lv: (own_weight if lv == rank else rest) for lv in lk}


def train_local(
    nested: NestedLoRA,
    rank: int,
    levels: Sequence[int],
    batches: Iterator[Any],
    loss_fn: LossFn,
    config: LocalTrainConfig,
    generator: torch.Generator,
    regulariser: Regulariser | None = None,
    on_step: Callable[[], None] | None = None,
) -> TrainStats:
    """Train ``nested`` (already holding the client's prefix) for ``config.steps`` steps.

    ``on_step`` is called after every optimiser step (progress display).
    """
    trained_dims = {"both": (0, 1), "A": (0,), "B": (1,)}[config.factors]
    params = [(p, d) for p, d in nested.parameters_with_rank_dim() if d in trained_dims]
    for p, _ in params:
        p.requires_grad_(True)
    opt = MaskedAdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    dist = level_distribution(rank, levels, config.own_weight) if config.mode != "plain" else {rank: 1.0}
    lv_list = list(dist)
    probs = torch.tensor([dist[lv] for lv in lv_list], dtype=torch.float64)
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    total = 0.0
    passes = examples = 0
    nested.model.train()
    try:
        for _ in range(config.steps):
            batch = next(batches)
            examples += batch_size(batch)
            if config.mode == "sample":
                pick = int(torch.multinomial(probs, 1, generator=generator).item())
                plan = [(lv_list[pick], 1.0)]
            else:
                plan = list(dist.items())
            opt.zero_grad()
            step_loss = 0.0
            for lv, weight in plan:
                nested.set_rank(lv)
                loss = loss_fn(nested.model, batch)
                obj = loss * weight
                if regulariser is not None and lv == rank:
                    obj = obj + regulariser(nested, rank)
                obj.backward()  # type: ignore[no-untyped-call]
                value = float(loss.detach())
                sums[lv] = sums.get(lv, 0.0) + value
                counts[lv] = counts.get(lv, 0) + 1
                passes += 1
                step_loss += weight * value
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p, _ in params], config.max_grad_norm)
            opt.step(max(lv for lv, _ in plan))
            total += step_loss
            if on_step is not None:
                on_step()
    finally:
        nested.set_rank(rank)
        nested.model.eval()
        for p, _ in params:
            p.requires_grad_(False)
            p.grad = None
    steps = max(config.steps, 1)
    return TrainStats(
        loss=total / steps,
        steps=config.steps,
        loss_per_level={lv: sums[lv] / counts[lv] for lv in sorted(sums)},
        passes=passes,
        examples=examples,
    )


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading size of its first tensor."""
    first = batch
    while not isinstance(first, torch.Tensor):
        if isinstance(first, dict):
            first = next(iter(first.values()))
        elif isinstance(first, list | tuple):
            first = first[0]
        else:
            return 0
    return int(first.shape[0]) if first.dim() else 1
