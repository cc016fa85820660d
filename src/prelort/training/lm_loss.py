"""Causal-LM training loss on answer tokens, with the LM head run only where it is needed.

    loss = sum_{(b, t): y[b, t+1] != -100} -log p(y[b, t+1] | x[b, <=t]) / #{labelled tokens}

This is the value of transformers' ``ForCausalLMLoss`` (mean over labelled next tokens), but
the output projection, the float copy of the logits and the softmax run only on the
positions t in the union of the batch's answer spans (``logits_to_keep`` as a 1-D index
tensor). With a 49k-token vocabulary the LM head is about a fifth of SmolLM2-135M's forward
FLOPs and its logits dominate activation memory, while prompts hold most positions. The
evaluator's perplexity pass (``prelort.evaluation.answer_nll``) uses the same computation,
summed. Models whose ``forward`` has no ``logits_to_keep`` get full logits, then the same
positions. ``answer_kl`` is the self-distillation loss on the same positions (``train.distill``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prelort.data.formatting import IGNORE_INDEX

_SUPPORTS_KEEP: dict[type, bool] = {}


def _supports_logits_to_keep(model: nn.Module) -> bool:
    get_base = getattr(model, "get_base_model", None)
    base: nn.Module = get_base() if callable(get_base) else model
    cls = type(base)
    if cls not in _SUPPORTS_KEEP:
        _SUPPORTS_KEEP[cls] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _SUPPORTS_KEEP[cls]


def _answer_positions(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets y[:, 1:] at the kept positions (B, |keep|), keep): the positions t whose t+1 is
    labelled in some row of the batch."""
    target = batch["labels"].to(device)[:, 1:]
    keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return target[:, keep], keep


def answer_targets(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The targets (B, |keep|) matching ``answer_logits``' positions (-100: no label)."""
    return _answer_positions(batch, device)[0]


def answer_logits(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits (B, |keep|, V), targets (B, |keep|)) on the union of the batch's answer
    positions; one forward. Targets are ``IGNORE_INDEX`` where a row has no label."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    target, keep = _answer_positions(batch, device)
    if keep.numel() > 0 and _supports_logits_to_keep(model):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, |keep|, V)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, keep]
    return logits.float(), target


def logits_nll(
    logits: torch.Tensor, target: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, K, V) against ``target`` (B, K), ``IGNORE_INDEX`` skipped."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def answer_token_nll(
    model: nn.Module, batch: dict[str, Any], reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Next-token NLL over the labelled tokens of ``batch`` (input_ids, attention_mask, labels),
    averaged or summed; logits only on the union of the batch's answer positions."""
    logits, target = answer_logits(model, batch)
    return logits_nll(logits, target, reduction)


def answer_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over labelled tokens of KL(teacher || student) between next-token distributions:

        sum_{(b, t): target[b, t] != -100} sum_v p_T(v) (log p_T(v) - log p_S(v)) / #{labelled},

    with ``p = softmax(logits)`` over the vocabulary; the teacher is detached (no gradient).
    ``student``, ``teacher``: (B, K, V) logits; ``target``: (B, K). 0 when nothing is labelled.
    """
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.detach().float(), dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (B, K)
    mask = (target != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of ``batch``: the LLM training loss."""
    return answer_token_nll(model, batch, "mean")
