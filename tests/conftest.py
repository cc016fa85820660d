"""Shared fixtures: tiny deterministic models built in the test."""

from __future__ import annotations

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
    torch.manual_seed(seed)
    return TinyNet()
