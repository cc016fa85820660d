"""What the federation needs from a task: a base model, client data, a loss, an evaluation.

Optional: self-distillation (``train.distill`` > 0) also needs ``outputs``, ``output_loss``
and ``distill_loss`` (``DistillWorkload``; the synthetic and LLM workloads have them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from prelort.training.local import Distiller


class Workload(Protocol):
    """A federated task. Client data and evaluation are indexed by client id 0..K-1."""

    target_modules: list[str]
    num_clients: int

    def build_model(self) -> nn.Module:
        """A fresh frozen base model (one per process, shared by all simulated clients)."""
        ...

    def num_examples(self, client: int) -> int:
        """n_k, the client's training-set size."""
        ...

    def batches(self, client: int, generator: torch.Generator) -> Iterator[Any]:
        """An endless stream of training batches for ``client`` drawn with ``generator``."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean training loss of ``model`` on ``batch``."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the held-out test split (at least ``loss``)."""
        ...


class DistillWorkload(Workload, Distiller, Protocol):
    """A workload that supports ``train.distill``: ``outputs(model, batch)`` (one forward),
    ``output_loss(outputs, batch)`` (= ``loss``) and ``distill_loss(student, teacher, batch)``
    (D with the teacher detached; ``prelort.training.local.Distiller``)."""
