"""One client's local update: plain LoRA or prefix-nested training (docs/design.md §2).

Client k with capacity r_k trains on levels L_k = {l in L : l <= r_k}:
- ``plain``: loss at truncation r_k only;
- ``all``: loss = sum_{l in L_k} c_l loss(model at l) / sum c_l, |L_k| passes per step;
- ``sample``: each step draws one level l ~ c (the own rank r_k with weight ``own_weight``)
  and trains that truncation only (DyLoRA-style, one pass per step);
- ``sandwich``: each step makes one pass at r_k and one at a lower level l drawn from c
  restricted to levels < r_k (renormalised) and minimises
  ``c_{r_k} loss(r_k) + (1 - c_{r_k}) loss(l)``, two passes per step. Its expectation over l
  is the ``all`` objective sum_l c_l loss(l), but the own rank is trained every step;
- ``matryoshka``: one pass per step of the model ``W x + s(r_k) B diag(w) A x`` with
  ``w_i = sum_{l in L_k, l > i} c_l s(l) / s(r_k)`` (MatryoshkaLoRA, ``matryoshka_weights``).
A client with one level trains ``sandwich`` and ``matryoshka`` exactly like ``plain``.
Level weights: the own rank gets ``own_weight``, the lower levels share ``1 - own_weight``
equally (``own_weight = None`` gives equal weights, ``"geometric"`` c_{l_j} proportional to
2^j). ``distill`` = lambda > 0 (``sandwich`` and ``all`` only, with a ``Distiller``): the
loss at a lower level l < r_k becomes ``(1 - lambda) loss(l) + lambda D(out(l), out(r_k))``
with the teacher ``out(r_k)`` the detached output of the same step's own-rank pass (FjORD's
self-distillation; no extra pass). Every optimiser step is masked to the largest truncation
that produced the gradient (``MaskedAdamW``). ``factors`` restricts training to B (A frozen,
FFA-LoRA) or to A. A pass is one forward + backward; ``TrainStats`` counts passes and examples.

Scale options (``training.schedule``): ``grad_accum`` = k makes every optimiser step
accumulate the gradients of k micro-batches, each micro-batch's objective divided by k, so a
step on k micro-batches of size b is the step on their concatenation (size k b) when the loss
is a mean; the levels of a step are drawn once and every micro-batch goes through them, and
``steps`` counts optimiser steps (k times the passes and examples of one micro-batch each).
``lr_schedule``/``warmup_steps``: a ``transformers`` schedule stepped once per optimiser step
over the round's ``steps``; ``autocast``: ``torch.autocast`` around the forward passes
(``fp16`` with a gradient scaler, CUDA only); ``gradient_checkpointing``: the model must
already have it on (``LLMWorkload.build_model``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from prelort.adapters.nested import NestedLoRA
from prelort.errors import ConfigError
from prelort.training.optim import MaskedAdamW
from prelort.training.schedule import (
    Autocast,
    LRSchedule,
    autocast_context,
    make_grad_scaler,
    make_scheduler,
    uses_gradient_checkpointing,
)

TrainMode = Literal["plain", "all", "sample", "sandwich", "matryoshka"]
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
    distill: float = 0.0
    """lambda of the self-distillation at lower levels (``sandwich`` and ``all``; 0: off)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (each objective divided by it); 1: no accumulation."""
    lr_schedule: LRSchedule = "constant"
    """Learning rate over the round's ``steps`` (``training.schedule.make_scheduler``)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up from 0 at the start of every round."""
    autocast: Autocast = "none"
    """Mixed precision of the forward passes: none, bf16 (CUDA or CPU) or fp16 (CUDA)."""
    gradient_checkpointing: bool = False
    """The model has activation checkpointing on (checked: ``train_local`` raises if not)."""


@runtime_checkable
class Distiller(Protocol):
    """What self-distillation (``distill`` > 0) needs from a workload: the outputs of one
    forward, the task loss from them, and the divergence of a student's from a teacher's."""

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's outputs on ``batch`` (one forward): what the loss is computed from."""
        ...

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The task loss from ``outputs``; equals ``loss(model, batch)``."""
        ...

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        """D(student, teacher) with the teacher detached (no gradient through it)."""
        ...


@dataclass(frozen=True)
class TrainStats:
    """Mean training loss, per level trained, optimiser steps, passes and examples processed."""

    loss: float
    steps: int
    loss_per_level: dict[int, float]
    passes: int = 0
    """Forward/backward passes of one micro-batch each (``all`` mode: |L_k| per micro-batch,
    ``grad_accum`` micro-batches per step)."""
    examples: int = 0
    """Training examples drawn (micro-batch sizes summed over steps)."""


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


def lower_level_distribution(dist: Mapping[int, float], rank: int) -> dict[int, float]:
    """``sandwich``'s draw of the lower level: c_l / sum_{l' < r_k} c_{l'} for l < r_k
    (uniform when the lower levels have no weight); empty when r_k is the only level."""
    lower = {lv: c for lv, c in dist.items() if lv < rank}
    total = sum(lower.values())
    if not lower:
        return {}
    if total <= 0:
        return {lv: 1.0 / len(lower) for lv in lower}
    return {lv: c / total for lv, c in lower.items()}


def matryoshka_weights(dist: Mapping[int, float], scale: Callable[[int], float] | None = None) -> list[float]:
    """MatryoshkaLoRA's diagonal P for levels with weights c (Modoranu, Safaryan & Alistarh,
    arXiv 2605.07850, §2 and Algorithm 1; authors' code ``adapters/matryoshka.py``).

    Returns w of length r_k = max(dist), ``w_i = sum_{l in dist, l > i} c_l s(l) / s(r_k)``
    (i = 0..r_k-1; ``scale`` = s, constant when None). The one-pass model
    ``W0 + s(r_k) B diag(w) A = W0 + sum_l c_l s(l) B[:, :l] A[:l]`` is the c-weighted sum of
    the truncated adapters, so its gradient is sum_l c_l s(l) (grad of the truncated models)
    evaluated at one point: the ``all`` gradient to first order, in one pass.

    What was read: the paper's abstract and table of contents (its body could not be read
    here) and the authors' released code, whose Algorithm 1 builds P_i = sum over training
    ranks r > i of s(r). Deviation: the authors weight every training rank by 1 (an
    unnormalised sum; their explicit-mask variant divides by the number of ranks); here each
    level l has the client's normalised weight c_l (``own_weight``), so with equal weights w
    is their explicit-mask (mean) variant, and under fixed scaling w_i = 1 on the dimensions
    every level shares.
    """
    top = max(dist)
    s_top = scale(top) if scale is not None else 1.0

    def rel(lv: int) -> float:
        return scale(lv) / s_top if scale is not None else 1.0

    return [sum(c * rel(lv) for lv, c in dist.items() if lv > i) for i in range(top)]


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
    distiller: Distiller | None = None,
) -> TrainStats:
    """Train ``nested`` (already holding the client's prefix) for ``config.steps`` optimiser
    steps of ``config.grad_accum`` micro-batches each.

    ``on_step`` is called after every optimiser step (progress display). ``distiller``
    computes the losses when ``config.distill`` > 0 in ``sandwich`` or ``all`` mode (required
    then). Losses in ``TrainStats`` are task losses (no distillation term).
    """
    accum = config.grad_accum
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"train.grad_accum = {accum!r} must be a positive integer")
    if config.gradient_checkpointing and not uses_gradient_checkpointing(nested.model):
        raise ConfigError(
            "train.gradient_checkpointing = true, but this workload's model has no gradient "
            "checkpointing (only Hugging Face models of the llm workload); set it to false"
        )
    forward_context = autocast_context(config.autocast, nested.model)
    scaler = make_grad_scaler(config.autocast, nested.model)
    trained_dims = {"both": (0, 1), "A": (0,), "B": (1,)}[config.factors]
    params = [(p, d) for p, d in nested.parameters_with_rank_dim() if d in trained_dims]
    for p, _ in params:
        p.requires_grad_(True)
    opt = MaskedAdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    scheduler = make_scheduler(opt, config.lr_schedule, config.warmup_steps, config.steps)
    mode = config.mode
    dist = level_distribution(rank, levels, config.own_weight) if mode != "plain" else {rank: 1.0}
    if mode in ("sandwich", "matryoshka") and len(dist) == 1:
        mode = "plain"  # one level: exactly plain LoRA
    lv_list = list(dist)
    probs = torch.tensor([dist[lv] for lv in lv_list], dtype=torch.float64)
    lower = lower_level_distribution(dist, rank)
    lower_list = list(lower)
    lower_probs = torch.tensor([lower[lv] for lv in lower_list], dtype=torch.float64)
    lam = config.distill
    use_distill = lam > 0 and mode in ("sandwich", "all") and bool(lower)
    if use_distill and distiller is None:
        raise ValueError("distill > 0 needs a distiller (the workload's outputs and distill_loss)")
    if mode == "matryoshka":
        nested.set_rank(rank)
        nested.set_dim_weights(matryoshka_weights(dist, nested.scaling))
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    total = 0.0
    passes = examples = 0
    nested.model.train()
    try:
        for _ in range(config.steps):
            micro = [next(batches) for _ in range(accum)]  # drawn before the levels, as at k = 1
            examples += sum(batch_size(b) for b in micro)
            if mode == "sample":
                pick = int(torch.multinomial(probs, 1, generator=generator).item())
                plan = [(lv_list[pick], 1.0)]
            elif mode == "sandwich":
                pick = int(torch.multinomial(lower_probs, 1, generator=generator).item())
                own = dist[rank]
                plan = [(rank, own), (lower_list[pick], 1.0 - own)]
            elif mode in ("plain", "matryoshka"):
                plan = [(rank, 1.0)]
            elif use_distill:  # all, own rank first: its output is the teacher
                plan = [(rank, dist[rank])] + [(lv, c) for lv, c in dist.items() if lv != rank]
            else:
                plan = list(dist.items())
            opt.zero_grad()
            step_loss = 0.0
            for batch in micro:
                step_loss += _accumulate(
                    nested,
                    rank,
                    plan,
                    batch,
                    loss_fn,
                    mode,
                    lam if use_distill else None,
                    distiller,
                    regulariser,
                    accum,
                    forward_context,
                    scaler,
                    sums,
                    counts,
                )
                passes += len(plan)
            if scaler is not None:
                scaler.unscale_(opt)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p, _ in params], config.max_grad_norm)
            top = max(lv for lv, _ in plan)
            if scaler is not None:
                scaler.step(opt, top)
                scaler.update()
            else:
                opt.step(top)
            if scheduler is not None:
                scheduler.step()
            total += step_loss
            if on_step is not None:
                on_step()
    finally:
        if mode == "matryoshka":
            nested.set_dim_weights(None)
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


def _accumulate(
    nested: NestedLoRA,
    rank: int,
    plan: Sequence[tuple[int, float]],
    batch: Any,
    loss_fn: LossFn,
    mode: str,
    lam: float | None,
    distiller: Distiller | None,
    regulariser: Regulariser | None,
    accum: int,
    forward_context: Callable[[], AbstractContextManager[Any]],
    scaler: torch.amp.GradScaler | None,
    sums: dict[int, float],
    counts: dict[int, int],
) -> float:
    """The passes of one micro-batch through the step's ``plan`` of (level, weight): each
    objective (divided by ``accum`` when it is above 1) is back-propagated into the factors'
    gradients; ``lam`` is the distillation weight (None: no distillation). Returns the
    micro-batch's weighted task loss divided by ``accum`` (adds to the step's mean loss)."""
    step_loss = 0.0
    teacher: torch.Tensor | None = None
    for lv, weight in plan:
        if mode != "matryoshka":
            nested.set_rank(lv)
        with forward_context():
            if lam is not None:
                assert distiller is not None
                out = distiller.outputs(nested.model, batch)
                loss = distiller.output_loss(out, batch)
                if lv == rank:
                    teacher = out.detach()
                    obj = loss * weight
                else:
                    assert teacher is not None
                    kd = distiller.distill_loss(out, teacher, batch)
                    obj = ((1.0 - lam) * loss + lam * kd) * weight
            else:
                loss = loss_fn(nested.model, batch)
                obj = loss * weight
        if regulariser is not None and lv == rank:
            obj = obj + regulariser(nested, rank)
        if accum > 1:
            obj = obj / accum
        (scaler.scale(obj) if scaler is not None else obj).backward()  # type: ignore[no-untyped-call]
        value = float(loss.detach())
        sums[lv] = sums.get(lv, 0.0) + value
        counts[lv] = counts.get(lv, 0) + 1
        step_loss += weight * value
    return step_loss / accum if accum > 1 else step_loss


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
