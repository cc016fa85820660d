"""Causal-LM training loss on answer tokens, with the LM head run only where it is needed.

    loss = sum_{(b, t): y[b, t+1] != -100} -log p(y[b, t+1] | x[b, <=t]) / #{labelled tokens}

This is the value of transformers' ``ForCausalLMLoss`` (mean over labelled next tokens), but
the output projection, the float copy of the logits and the softmax run only on the
positions t in the union of the batch's answer spans (``logits_to_keep`` as a 1-D index
tensor). With a 49k-token vocabulary the LM head is about a fifth of SmolLM2-135M's forward
FLOPs and its logits dominate activation memory, while prompts hold most positions. The
evaluator's perplexity pass (``prelort.evaluation.answer_nll``) uses the same computation,
summed. Models whose ``forward`` has no ``logits_to_keep`` get full logits, then the same
positions.
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


def answer_token_nll(
    model: nn.Module, batch: dict[str, Any], reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Next-token NLL over the labelled tokens of ``batch`` (input_ids, attention_mask, labels),
    averaged or summed; logits only on the union of the batch's answer positions."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    target = batch["labels"].to(device)[:, 1:]
    keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions t whose t+1 is labelled
    if keep.numel() > 0 and _supports_logits_to_keep(model):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, |keep|, V)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, keep]
    logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target[:, keep].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of ``batch``: the LLM training loss."""
    return answer_token_nll(model, batch, "mean")
