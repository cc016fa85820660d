"""A synthetic federated regression task that runs in seconds with no LLM.

Base model: a frozen random MLP  x -> head(tanh(fc2(tanh(fc1 x)))). The teacher is the same
MLP with a low-rank change on fc1 and fc2,

    dW = U diag(sigma) V^T,   sigma_i = teacher_scale * spectrum_decay^i,  i < teacher_rank,

so the leading directions matter most. Each client regresses the teacher's output on its
own input distribution x = mu_k + D_k z (z ~ N(0, I), random mean mu_k and per-coordinate
scales D_k: non-IID), with n_k examples drawn between ``min_examples`` and
``max_examples``. The test set pools fresh draws from every client's distribution. Metrics:
``loss`` (test MSE) and ``rel_loss`` = MSE / MSE of the untouched base model (the fraction of
the teacher's change not yet learned).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prelort.config import SyntheticSection


class MLP(nn.Module):
    """The base network; adapters go on ``fc1`` and ``fc2``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return out


def _low_rank_change(out_f: int, in_f: int, cfg: SyntheticSection, gen: torch.Generator) -> torch.Tensor:
    r = min(cfg.teacher_rank, out_f, in_f)
    U, _ = torch.linalg.qr(torch.randn(out_f, r, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_f, r, generator=gen))
    sigma = cfg.teacher_scale * cfg.spectrum_decay ** torch.arange(r, dtype=torch.float32)
    change: torch.Tensor = (U * sigma) @ V.T  # (out, in)
    return change


class SyntheticWorkload:
    """Non-IID clients regressing a low-rank-perturbed teacher MLP (MSE)."""

    def __init__(self, cfg: SyntheticSection, num_clients: int, batch_size: int) -> None:
        self.cfg = cfg
        self.target_modules = ["fc1", "fc2"]
        self.num_clients = num_clients
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(cfg.data_seed if cfg.data_seed is not None else 0)
        self._base_state = MLP(cfg.d_in, cfg.hidden, cfg.d_out).state_dict()
        # Re-initialise deterministically from the data seed (nn.Linear uses the global RNG).
        for key, value in self._base_state.items():
            bound = 1.0 / value.shape[-1] ** 0.5 if value.dim() == 2 else 0.1
            self._base_state[key] = (torch.rand(value.shape, generator=gen) * 2 - 1) * bound * 2
        self.teacher = self._mlp()
        with torch.no_grad():
            self.teacher.fc1.weight += _low_rank_change(cfg.hidden, cfg.d_in, cfg, gen)
            self.teacher.fc2.weight += _low_rank_change(cfg.hidden, cfg.hidden, cfg, gen)
        self.means = torch.randn(num_clients, cfg.d_in, generator=gen) * cfg.input_shift
        self.scales = torch.rand(num_clients, cfg.d_in, generator=gen) * 1.5 + 0.25
        sizes = torch.randint(cfg.min_examples, cfg.max_examples + 1, (num_clients,), generator=gen)
        self.sizes = [int(s) for s in sizes]
        self.train_x = [self._draw(k, n, gen) for k, n in enumerate(self.sizes)]
        with torch.no_grad():
            self.train_y = [self.teacher(x) for x in self.train_x]
        per = max(cfg.test_examples // num_clients, 1)
        self.test_x = torch.cat([self._draw(k, per, gen) for k in range(num_clients)])
        with torch.no_grad():
            self.test_y = self.teacher(self.test_x)
            self.base_mse = float(((self.build_model()(self.test_x) - self.test_y) ** 2).mean())

    def _draw(self, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.means[k] + torch.randn(n, self.cfg.d_in, generator=gen) * self.scales[k]

    def build_model(self) -> nn.Module:
        return self._mlp()

    def _mlp(self) -> MLP:
        model = MLP(self.cfg.d_in, self.cfg.hidden, self.cfg.d_out)
        model.load_state_dict(self._base_state)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def num_examples(self, client: int) -> int:
        return self.sizes[client]

    def batches(self, client: int, generator: torch.Generator) -> Iterator[Any]:
        x, y = self.train_x[client], self.train_y[client]
        n = x.shape[0]
        while True:
            idx = torch.randperm(n, generator=generator)
            for i in range(0, n - self.batch_size + 1 if n >= self.batch_size else 1, self.batch_size):
                sel = idx[i : i + self.batch_size]
                yield x[sel], y[sel]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.mean((model(x) - y) ** 2)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The predictions on the batch's inputs (one forward)."""
        out: torch.Tensor = model(batch[0])
        return out

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """MSE of ``outputs`` against the batch's targets (= ``loss``)."""
        return torch.mean((outputs - batch[1]) ** 2)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        """Self-distillation: mean squared error mean((student - teacher)^2), teacher detached."""
        return torch.mean((student - teacher.detach()) ** 2)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            mse = float(((model(self.test_x) - self.test_y) ** 2).mean())
        return {"loss": mse, "rel_loss": mse / self.base_mse}
