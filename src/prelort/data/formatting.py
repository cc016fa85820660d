"""Prompt formatting, tokenisation with label masking, and batch collation.

A training sequence is ``prompt tokens + answer tokens + eos``; the loss is taken on
the answer and its eos only (labels are -100 on the prompt and on padding). Padding is
recognised by the attention mask, never by the pad id: SmolLM2's pad token *is* its
eos token, and the answer's final eos must keep its label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from prelort.data.examples import DataError, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of positions that take no loss (PyTorch's cross-entropy ``ignore_index``)."""

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
"""Prompt template for tokenizers without a chat template."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, history: Sequence[tuple[str, str]] = ()
) -> str:
    """The prompt as the model sees it, up to where the answer starts.

    With a chat template: the ``history`` turns, one user turn and the generation prompt
    (the assistant header). Without one: :data:`PLAIN_TEMPLATE`, the history written before it
    as ``role: content`` paragraphs.
    """
    if not has_chat_template(tokenizer):
        earlier = "".join(f"{role}: {content}\n\n" for role, content in history)
        return earlier + PLAIN_TEMPLATE.format(prompt=prompt)
    messages = [{"role": role, "content": content} for role, content in history]
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise DataError(f"the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


def _ids(encoded: Any) -> list[int]:
    return [int(token) for token in encoded["input_ids"]]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, history: Sequence[tuple[str, str]] = ()
) -> list[int]:
    """Token ids of :func:`format_prompt` (for generation and likelihood scoring).

    A chat template writes its own special tokens (e.g. Gemma's ``<bos>``), so they
    are not added again; the plain template gets the tokenizer's usual ones.
    """
    text = format_prompt(tokenizer, prompt, history)
    return _ids(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer)))


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of the answer followed by eos (no other special tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token")
    return [*_ids(tokenizer(answer, add_special_tokens=False)), int(eos)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of one training example.

    labels[t] = -100 on prompt tokens and input_ids[t] on the answer tokens and the
    final eos. Sequences longer than ``max_length`` lose prompt tokens from the left,
    so the answer is kept whole; only an answer that would leave the prompt less than
    half the window (or less than the whole prompt, if shorter) is cut on the right.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    prompt = encode_prompt(tokenizer, example.prompt, example.history)
    answer = encode_answer(tokenizer, example.target)
    if len(prompt) + len(answer) > max_length:
        keep = max(max_length - len(answer), min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep :]
        answer = answer[: max_length - keep]
    input_ids = prompt + answer
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def collate(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch of ``(batch, max_len)`` long tensors.

    Padding gets ``pad_token_id``, attention 0 and label -100; labels are set to -100
    wherever ``attention_mask`` is 0, so an eos equal to the pad id keeps its label.
    ``labels`` is returned only when every feature has them.
    """
    if not features:
        raise DataError("collate got no features; the batch is empty")
    with_labels = ["labels" in feature for feature in features]
    if any(with_labels) and not all(with_labels):
        raise DataError("collate: some features have labels and some do not; encode them alike")
    length = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        mask = feature.get("attention_mask", [1] * n)
        if len(mask) != n or (all(with_labels) and len(feature["labels"]) != n):
            raise DataError(f"collate: feature {row} has fields of different lengths")
        input_ids[row, :n] = torch.tensor(list(feature["input_ids"]), dtype=torch.long)
        attention_mask[row, :n] = torch.tensor(list(mask), dtype=torch.long)
        if all(with_labels):
            labels[row, :n] = torch.tensor(list(feature["labels"]), dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all(with_labels):
        batch["labels"] = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return batch
