"""Per-round learning-rate schedules, mixed precision and gradient checkpointing of local training.

- ``make_scheduler``: ``train.lr_schedule`` with ``train.warmup_steps`` as a
  ``transformers.get_scheduler`` schedule over one client's local optimiser steps of a round
  (a fresh optimiser, so a fresh schedule, every round). Constant without warm-up creates no
  scheduler at all (the learning rate is never touched).
- ``autocast_context`` / ``make_grad_scaler``: ``train.autocast`` as ``torch.autocast`` around
  the forward passes (bf16 on CUDA or CPU, fp16 on CUDA only, with a ``torch.amp.GradScaler``).
- ``enable_gradient_checkpointing``: ``train.gradient_checkpointing`` on a Hugging Face model
  (non-reentrant activation checkpointing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from prelort.errors import ConfigError, UserError

LRSchedule = Literal["constant", "linear", "cosine"]
Autocast = Literal["none", "bf16", "fp16"]

_HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, warmup_steps: int, total_steps: int
) -> Any | None:
    """The scheduler of one client's round, stepped once per optimiser step, or None.

    Learning rate at optimiser step t (0-based; ``lr`` the base rate, W = ``warmup_steps``,
    T = ``total_steps``): ``lr * t / W`` while t < W (so the first step of a warm-up uses 0),
    then ``constant``: ``lr``; ``linear``: ``lr * max(0, (T - t) / max(1, T - W))``;
    ``cosine``: ``lr * max(0, (1 + cos(pi * (t - W) / max(1, T - W))) / 2)``
    (``transformers.get_scheduler``'s ``constant_with_warmup``, ``linear`` and ``cosine``).
    ``constant`` with W = 0 returns None: no scheduler, the optimiser's rate untouched.
    """
    if schedule not in _HF_NAMES:
        raise ConfigError(f"train.lr_schedule = {schedule!r} is not one of 'constant', 'linear', 'cosine'")
    if schedule == "constant" and warmup_steps == 0:
        return None
    from transformers import get_scheduler

    return get_scheduler(
        _HF_NAMES[schedule],
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
    )


def _device_type(model: nn.Module) -> str:
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else "cpu"


def autocast_context(
    mode: Autocast, model: nn.Module
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the context around every forward pass (``train.autocast``).

    ``none``: no context (full precision); ``bf16``: ``torch.autocast`` in bfloat16 on the
    model's device (CUDA or CPU); ``fp16``: float16 autocast on CUDA only, a ``UserError``
    naming ``train.autocast`` on any other device.
    """
    if mode == "none":
        return contextlib.nullcontext
    device = _device_type(model)
    if mode == "fp16" and device != "cuda":
        raise UserError(
            f'train.autocast = "fp16" needs a CUDA device, but the model is on {device}; '
            'use "bf16" (CPU autocast) or "none"'
        )
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"train.autocast = {mode!r} is not one of 'none', 'bf16', 'fp16'")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device, dtype=dtype)


def make_grad_scaler(mode: Autocast, model: nn.Module) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for fp16 autocast on CUDA; None otherwise (bf16 needs none)."""
    if mode != "fp16":
        return None
    return torch.amp.GradScaler(_device_type(model))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """``train.gradient_checkpointing``: the Hugging Face model's non-reentrant activation
    checkpointing (``gradient_checkpointing_enable(use_reentrant=False)``, or its successor
    ``activation_checkpointing_enable`` where transformers has it: the old name warns there);
    a ``ConfigError`` for a model without it."""
    kwargs = {"use_reentrant": False}
    newer = getattr(model, "activation_checkpointing_enable", None)
    older = getattr(model, "gradient_checkpointing_enable", None)
    if newer is not None and getattr(model, "supports_gradient_checkpointing", False):
        newer(activation_checkpointing_kwargs=kwargs)
    elif older is not None and getattr(model, "supports_gradient_checkpointing", False):
        older(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            f"train.gradient_checkpointing = true, but the model ({type(model).__name__}) does not "
            "support gradient checkpointing; set it to false"
        )


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` has Hugging Face gradient checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
