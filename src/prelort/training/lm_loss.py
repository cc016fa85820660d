"""Causal-LM training loss on answer tokens, with the LM head run only where it is needed.

    loss = sum_{(b, t): y[b, t+1] != -100} -log p(y[b, t+1] | x[b, <=t]) / #{labelled tokens}

This is the value of transformers' ``ForCausalLMLoss`` (mean over labelled next tokens), but
the output projection, the float copy of the logits and the softmax run only on the
positions t in the union of the batch's answer spans (``logits_to_keep`` as a 1-D index
tensor). With a 49k-token vocabulary the LM head is about a fifth of SmolLM2-135M's forward
FLOPs and its logits dominate activation memory, while prompts hold most positions.
"""

from __future__ import annotations

import inspect
from typing import Any

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


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of ``batch`` (input_ids, attention_mask, labels)."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    target = labels[:, 1:]
    keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions t whose t+1 is labelled
    if keep.numel() == 0 or not _supports_logits_to_keep(model):
        loss: torch.Tensor = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()  # (B, |keep|, V)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target[:, keep].reshape(-1), ignore_index=IGNORE_INDEX
    )
