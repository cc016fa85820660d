"""AdamW whose step touches only the first r rank dimensions of each LoRA factor.

With plain AdamW, momentum from earlier steps at a larger truncation keeps moving
coordinates >= r even when their gradient is zero, and weight decay shrinks them. Here a
step at truncation r updates, for A[:r] and B[:, :r] only (Loshchilov & Hutter, ICLR 2019):

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,
    p <- p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),

with a step count t per rank dimension, so a dimension's bias correction counts only the
steps that trained it. At r = R this is exactly ``torch.optim.AdamW``.

A ``torch.optim.Optimizer`` with one parameter group, so learning-rate schedulers
(``training.schedule``) and ``torch.amp.GradScaler`` drive it: ``step`` reads the group's
``lr``, which a scheduler changes between steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW over LoRA factors given as (parameter, rank dimension) pairs."""

    def __init__(
        self,
        params: Iterable[tuple[torch.nn.Parameter, int]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__([p for p, _ in self.params], defaults)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.moments: list[dict[str, torch.Tensor]] = []
        """Per factor: AdamW's moments and the step count of every rank dimension."""
        for p, dim in self.params:
            self.moments.append(
                {
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "step": torch.zeros(p.shape[dim], dtype=torch.float64),
                }
            )

    @property
    def lr(self) -> float:
        """The learning rate of the next step (the parameter group's, set by a scheduler)."""
        return float(self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, rank: int) -> None:  # type: ignore[override]  # a rank, not a closure
        """One AdamW step on rank dimensions [0, rank) of every factor; the rest never move."""
        b1, b2 = self.betas
        lr = self.lr
        for (p, dim), st in zip(self.params, self.moments, strict=True):
            if p.grad is None:
                continue
            r = min(rank, p.shape[dim])
            param = p.narrow(dim, 0, r)
            grad = p.grad.narrow(dim, 0, r)
            m = st["exp_avg"].narrow(dim, 0, r)
            v = st["exp_avg_sq"].narrow(dim, 0, r)
            t = st["step"][:r]
            t += 1
            shape = [1, 1]
            shape[dim] = r
            bc1 = (1 - b1**t).to(p.dtype).view(shape)
            bc2 = (1 - b2**t).to(p.dtype).view(shape)
            param.mul_(1 - lr * self.weight_decay)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            param.addcdiv_(m / bc1, denom, value=-lr)
