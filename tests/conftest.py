"""Shared fixtures: tiny deterministic models built in the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two target linears and an untouched head."""

    def __init__(self, d_in: int = 6, hidden: int = 10, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def tiny_net(seed: int = 0) -> TinyNet:
    """A ``TinyNet`` with weights from ``seed``; torch's global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet()


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower messages read the run and node of the current task; a ServerApp process sets
    them, so in-process tests of the Flower apps set them here and restore them after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
