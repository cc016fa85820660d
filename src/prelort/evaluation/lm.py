"""Causal-LM evaluation primitives and the per-rank evaluator of LLM workloads.

- accuracy: argmax_c sum_t log p(c_t | prompt, c_<t) over each choice c (answer + eos);
  prompts run in left-padded batches, each prompt's KV cache shared by all its choices;
- ROUGE-L: greedy decoding (left-padded batches) up to ``max_new_tokens``;
- perplexity: exp(sum NLL / number of answer tokens) on the test answers (+ eos).
Tokenisation is done once when the evaluator is built and reused for every rank level.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prelort.data.examples import Example
from prelort.data.formatting import IGNORE_INDEX, collate, encode_answer, encode_example
from prelort.evaluation.metrics import accuracy, rouge_l
from prelort.training.lm_loss import answer_token_nll


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use what exists."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def choice_logprobs(
    model: nn.Module, prompt_ids: Sequence[int], choice_ids: Sequence[Sequence[int]], pad_id: int
) -> list[float]:
    """log p(choice | prompt) for every choice; the prompt's KV cache is computed once."""
    return batch_choice_logprobs(model, [prompt_ids], [choice_ids], pad_id)[0]


@torch.no_grad()
def batch_choice_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
) -> list[list[float]]:
    """log p(c | prompt_b) = sum_t log p(c_t | prompt_b, c_<t) for every choice c of every prompt b.

    One pass over the left-padded prompts (positions counted from each prompt's first real
    token, only the last position's logits), then the prompt KV cache is copied to one row
    per multi-token choice and the choices' remaining tokens run in a second pass.
    """
    device = _device(model)
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(list(p))
        mask[b, T - len(p) :] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): only the last position's logits
    scores = [[float(first[b, c[0]]) for c in choices[b]] for b in range(B)]
    rows = [(b, i) for b in range(B) for i, c in enumerate(choices[b]) if len(c) > 1]
    if not rows:
        return scores
    L = max(len(choices[b][i]) - 1 for b, i in rows)
    inp = torch.full((len(rows), L), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(rows), L), dtype=torch.long)
    for r, (b, i) in enumerate(rows):
        c = list(choices[b][i])
        inp[r, : len(c) - 1] = torch.tensor(c[:-1])
        cont_mask[r, : len(c) - 1] = 1
    src = torch.tensor([b for b, _ in rows])
    cache = _output_cache(out)
    cache.reorder_cache(src.to(device))  # row r continues prompt src[r]
    lengths = torch.tensor([len(prompts[b]) for b, _ in rows])
    kwargs = {_cache_kwarg(model): cache}
    logits = model(
        input_ids=inp.to(device),
        attention_mask=torch.cat([mask[src], cont_mask], dim=1).to(device),
        position_ids=(lengths[:, None] + torch.arange(L)[None, :]).to(device),
        **kwargs,
    ).logits.float()
    logp = logits.log_softmax(-1)  # (rows, L, V)
    for r, (b, i) in enumerate(rows):
        c = list(choices[b][i])
        scores[b][i] += float(sum(logp[r, j - 1, c[j]] for j in range(1, len(c))))
    return scores


@torch.no_grad()
def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL over labelled positions, and their count."""
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return float(answer_token_nll(model, batch, "sum")), count


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int, eos_id: int
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (new tokens only, up to eos)."""
    device = _device(model)
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = torch.tensor(list(p))
        mask[row, T - len(p) :] = 1
    gen: Any = model.generate  # type: ignore[operator]
    out = gen(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    results: list[list[int]] = []
    for row in out[:, T:].tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


class LMEvaluator:
    """Evaluates a causal LM on a fixed test split; built once, called per rank level.

    Metrics: ``loss`` (mean answer NLL), ``perplexity`` = exp(loss), ``accuracy`` when the
    examples have choices, ``rouge_l`` (mean best-over-references F) when ``generate``.
    """

    def __init__(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        *,
        max_length: int = 512,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        generate: bool = False,
    ) -> None:
        if not examples:
            raise ValueError("the test split is empty; use more data or a larger test fraction")
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.generate = generate
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_id = int(tokenizer.eos_token_id)
        self.features = [encode_example(tokenizer, ex, max_length) for ex in self.examples]
        self.with_choices = [i for i, ex in enumerate(self.examples) if ex.choices and ex.answer is not None]
        # the (possibly left-truncated) prompt exactly as in the training encoding
        self.prompt_ids = {
            i: f["input_ids"][: f["labels"].count(IGNORE_INDEX)] for i, f in enumerate(self.features)
        }
        self.choice_ids = {
            i: [encode_answer(tokenizer, c) for c in self.examples[i].choices] for i in self.with_choices
        }
        # Examples whose training target is the correct choice and whose prompt was not
        # truncated: their perplexity comes from the choice scores, with no second pass.
        self.target_is_answer = {
            i
            for i in self.with_choices
            if self.choice_ids[i][self.examples[i].answer or 0]
            == self.features[i]["input_ids"][len(self.prompt_ids[i]) :]
        }

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model)
        finally:
            model.train(was_training)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        nll, count = 0.0, 0
        metrics: dict[str, float] = {}
        if self.with_choices:
            preds, answers = [], []
            all_scores: list[list[float]] = []
            for start in range(0, len(self.with_choices), self.batch_size):
                idx = self.with_choices[start : start + self.batch_size]
                all_scores += batch_choice_logprobs(
                    model, [self.prompt_ids[i] for i in idx], [self.choice_ids[i] for i in idx], self.pad_id
                )
            for i, scores in zip(self.with_choices, all_scores, strict=True):
                preds.append(max(range(len(scores)), key=scores.__getitem__))
                answer = int(self.examples[i].answer)  # type: ignore[arg-type]
                answers.append(answer)
                if i in self.target_is_answer:  # the correct choice's NLL is the answer NLL
                    nll -= scores[answer]
                    count += len(self.choice_ids[i][answer])
            metrics["accuracy"] = accuracy(preds, answers)
        rest = [f for i, f in enumerate(self.features) if i not in self.target_is_answer]
        for start in range(0, len(rest), self.batch_size):
            batch = collate(rest[start : start + self.batch_size], self.pad_id)
            s, n = answer_nll(model, batch)
            nll, count = nll + s, count + n
        loss = nll / max(count, 1)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **metrics}
        if self.generate:
            scores_r: list[float] = []
            order = sorted(range(len(self.examples)), key=lambda i: len(self.prompt_ids[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                outs = greedy_generate(
                    model,
                    [self.prompt_ids[i] for i in idx],
                    max_new_tokens=self.max_new_tokens,
                    pad_id=self.pad_id,
                    eos_id=self.eos_id,
                )
                for i, toks in zip(idx, outs, strict=True):
                    text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
                    scores_r.append(rouge_l(text, self.examples[i].references))
            metrics["rouge_l"] = sum(scores_r) / len(scores_r)
        return metrics
