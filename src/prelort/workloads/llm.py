"""Federated fine-tuning of a causal LM on a real dataset.

The base model is loaded once per run (``prelort.models``); the data is loaded, split into a
held-out test set and client partitions (``prelort.data``), and tokenised once. The training
loss is the mean next-token cross-entropy on answer tokens; evaluation reports loss,
perplexity, accuracy (choice log-likelihood) and ROUGE-L (greedy answers) where the task has
them (``prelort.evaluation``).
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prelort.config import Config, LLMSection
from prelort.data import (
    SOURCES,
    Example,
    collate,
    encode_example,
    load_source,
    partition_indices,
    train_test_split,
)
from prelort.errors import ConfigError
from prelort.evaluation import LMEvaluator
from prelort.training.lm_loss import answer_kl, answer_logits, answer_loss, answer_targets, logits_nll


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _source_options(s: LLMSection, *, evaluation: bool = False) -> dict[str, Any]:
    """The ``[llm]`` options the loader of ``s.source`` (or, with ``evaluation``, of
    ``s.eval_source``) in ``prelort.data.SOURCES`` names.

    ``path``: llm.path (llm.eval_path) with ``~`` and $VARS expanded; ``dataset_id``: the same
    as given (a hub id or builder); ``max_chars``, ``tasks``, ``max_per_task``, ``fields``,
    ``split`` (llm.eval_split), ``name``, ``data_files`` (llm.eval_data_files): those keys.
    Unset ones (empty path, no tasks or fields, max_per_task 0) are left out, so the loader's
    defaults apply; a loader with ``**options`` gets every set one.
    """
    source = s.eval_source if evaluation else s.source
    path = (s.eval_path or s.path) if evaluation else s.path
    if "$" in path and "$" in _expand(path):
        key = "llm.eval_path" if evaluation and s.eval_path else "llm.path"
        raise ConfigError(f"{key} {path!r} uses an unset environment variable; set it or give a path")
    values = {
        "path": _expand(path) or None,
        "dataset_id": path or None,
        "max_chars": s.max_chars,
        "tasks": s.tasks or None,
        "max_per_task": s.max_per_task or None,
        "fields": s.fields or None,
        "split": (s.eval_split or s.split) if evaluation else s.split,
        "name": s.name or None,
        "data_files": [
            _expand(f) for f in ((s.eval_data_files or s.data_files) if evaluation else s.data_files)
        ]
        or None,
    }
    loader = SOURCES.get(source)
    if loader is None:  # reaches load_source, which names the registered sources
        return {}
    parameters = inspect.signature(loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in values.items() if v is not None and (takes_any or k in parameters)}


def _sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    if not n or len(examples) <= n:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_examples(s: LLMSection) -> list[Example]:
    """The configured source, optionally a seeded random subset of ``max_examples``."""
    examples = load_source(s.source, **_source_options(s))
    return _sample(examples, s.max_examples, s.data_seed if s.data_seed is not None else 0)


def split_examples(s: LLMSection) -> tuple[list[Example], list[Example]]:
    """(train, test): without ``llm.eval_source``, ``llm.test_examples`` held out of the source
    at random (seed ``llm.data_seed``); with it, every source example trains and the test set
    is a seeded sample of ``llm.test_examples`` from the evaluation source."""
    examples = load_examples(s)
    seed = s.data_seed if s.data_seed is not None else 0  # resolved by the config loader
    if s.eval_source:
        test = load_source(s.eval_source, **_source_options(s, evaluation=True))
        return examples, _sample(test, s.test_examples, seed)
    if len(examples) <= s.test_examples:
        raise ConfigError(
            f"llm.test_examples = {s.test_examples} leaves no training data from {len(examples)} examples"
        )
    train_idx, test_idx = train_test_split(len(examples), s.test_examples / len(examples), seed)
    return [examples[i] for i in train_idx], [examples[i] for i in test_idx]


class LLMWorkload:
    """Clients fine-tune a causal LM on non-IID partitions of one dataset."""

    def __init__(self, cfg: Config) -> None:
        from prelort.models import default_target_modules, load_causal_lm

        s = cfg.llm
        self.cfg = s
        self.num_clients = cfg.clients.num_clients
        self.batch_size = cfg.train.batch_size
        self.gradient_checkpointing = cfg.train.gradient_checkpointing
        self.autocast = cfg.train.autocast
        self._load = lambda: load_causal_lm(
            s.model,
            dtype=s.dtype,
            device=s.device,
            cache_dir=s.cache_dir or None,
            quantization=s.quantization,
        )
        model, self.tokenizer = self._load()
        self._model: nn.Module | None = model
        self.target_modules = list(cfg.lora.target_modules or default_target_modules(model))
        self.pad_id = int(
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

        self.train, self.test = split_examples(s)
        seed = s.data_seed if s.data_seed is not None else 0  # resolved by the config loader
        parts = partition_indices(
            [ex.category for ex in self.train],
            self.num_clients,
            s.partition,
            alpha=s.dirichlet_alpha,
            tasks_per_client=s.tasks_per_client,
            seed=seed,
        )
        self.partitions = parts
        self.features = [
            [encode_example(self.tokenizer, self.train[i], s.max_length) for i in p] for p in parts
        ]
        self.evaluator = LMEvaluator(
            self.tokenizer,
            self.test,
            max_length=s.max_length,
            batch_size=s.eval_batch_size,
            max_new_tokens=s.max_new_tokens,
            generate=s.rouge,
        )

    def build_model(self) -> nn.Module:
        """The loaded base model (first call), then a fresh load for every later run; with
        ``train.gradient_checkpointing`` its activation checkpointing is on (a ``ConfigError``
        for a model without it). ``train.autocast = "fp16"`` off CUDA is a ``UserError`` here,
        before any client trains."""
        from prelort.training.schedule import autocast_context, enable_gradient_checkpointing

        if self._model is not None:
            model, self._model = self._model, None
        else:
            model = self._load()[0]
        autocast_context(self.autocast, model)  # raises for fp16 on a device without it
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def num_examples(self, client: int) -> int:
        return len(self.features[client])

    def batches(self, client: int, generator: torch.Generator) -> Iterator[Any]:
        feats = self.features[client]
        if not feats:
            raise ConfigError(f"client {client} has no training examples; use fewer clients or more data")
        bs = min(self.batch_size, len(feats))
        while True:
            order = torch.randperm(len(feats), generator=generator).tolist()
            for i in range(0, len(order) - bs + 1, bs):
                yield collate([feats[j] for j in order[i : i + bs]], self.pad_id)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return answer_loss(model, batch)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Float logits (B, K, V) on the union of the batch's answer positions (one forward)."""
        return answer_logits(model, batch)[0]

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Mean next-token NLL of the labelled tokens from ``outputs`` (= ``loss``)."""
        return logits_nll(outputs, answer_targets(batch, outputs.device))

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        """Self-distillation: mean KL(teacher || student) of the next-token distributions over
        the labelled (answer) tokens, teacher detached (``answer_kl``)."""
        return answer_kl(student, teacher, answer_targets(batch, student.device))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluator(model)
