"""Local training: masked AdamW, nested objectives, HetLoRA's regulariser and pruning."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import tiny_net
from prelort.adapters import LoRAPair, NestedLoRA, Scaling
from prelort.training import LocalTrainConfig, MaskedAdamW, level_distribution, train_local
from prelort.training.hetlora import make_regulariser, pruned_rank, tail_norm


def _nested(R: int = 8) -> NestedLoRA:
    nested = NestedLoRA(tiny_net(0), ["fc1", "fc2"], Scaling("fixed", 16.0, R))
    g = torch.Generator().manual_seed(1)
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(R, s[1], generator=g) * 0.3, torch.randn(s[0], R, generator=g) * 0.3)
            for n, s in nested.shapes().items()
        }
    )
    return nested


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 6, generator=g)
        yield x, torch.sin(x[:, :4] * 3)


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.mean((model(x) - y) ** 2)


def test_masked_adamw_at_full_rank_is_torch_adamw() -> None:
    p1 = torch.nn.Parameter(torch.randn(4, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = MaskedAdamW([(p1, 0)], lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW([p2], lr=0.05, weight_decay=0.1)
    for i in range(5):
        g = torch.randn(4, 5, generator=torch.Generator().manual_seed(i))
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(4)
        ref.step()
    torch.testing.assert_close(p1, p2)


@pytest.mark.parametrize("dim", [0, 1])
def test_step_at_truncation_r_never_moves_coordinates_beyond_r(dim: int) -> None:
    shape = (8, 5) if dim == 0 else (5, 8)
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = MaskedAdamW([(p, dim)], lr=0.1, weight_decay=0.01)
    torch_p = torch.nn.Parameter(p.detach().clone())
    torch_opt = torch.optim.AdamW([torch_p], lr=0.1, weight_decay=0.01)
    for i in range(3):  # earlier steps at the larger truncation R = 8 build momentum everywhere
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        p.grad, torch_p.grad = g.clone(), g.clone()
        opt.step(8)
        torch_opt.step()
    tail_before = p.detach().narrow(dim, 2, 6).clone()
    head_before = p.detach().narrow(dim, 0, 2).clone()
    torch_tail_before = torch_p.detach().narrow(dim, 2, 6).clone()
    for _ in range(3):  # now train truncation r = 2: gradient is zero beyond r
        g = torch.zeros(*shape)
        g.narrow(dim, 0, 2).copy_(torch.randn(*g.narrow(dim, 0, 2).shape))
        p.grad, torch_p.grad = g.clone(), g.clone()
        opt.step(2)
        torch_opt.step()
    torch.testing.assert_close(p.detach().narrow(dim, 2, 6), tail_before, rtol=0, atol=0)
    assert not torch.equal(p.detach().narrow(dim, 0, 2), head_before)
    # the prototype's failure this guards against: plain AdamW keeps moving the tail
    assert not torch.allclose(torch_p.detach().narrow(dim, 2, 6), torch_tail_before)


def test_level_distribution() -> None:
    assert level_distribution(8, [2, 4, 8, 16], 0.7) == pytest.approx({2: 0.15, 4: 0.15, 8: 0.7})
    assert level_distribution(8, [2, 4, 8, 16], None) == pytest.approx({2: 1 / 3, 4: 1 / 3, 8: 1 / 3})
    assert level_distribution(2, [2, 4, 8], 0.7) == {2: 1.0}


@pytest.mark.parametrize("mode", ["plain", "all", "sample"])
def test_train_local_only_moves_the_client_prefix(mode: str) -> None:
    nested = _nested()
    rank = 4
    nested.set_adapter(nested.get_adapter(rank))  # a rank-4 client received its prefix
    before = nested.get_adapter(8)
    cfg = LocalTrainConfig(steps=6, lr=0.05, mode=mode)  # type: ignore[arg-type]
    stats = train_local(nested, rank, [2, 4, 8], _batches(), _loss, cfg, torch.Generator().manual_seed(0))
    after = nested.get_adapter(8)
    for name in after:
        assert torch.count_nonzero(after[name].A[rank:]) == 0
        assert torch.count_nonzero(after[name].B[:, rank:]) == 0
        assert not torch.equal(after[name].A[:rank], before[name].A[:rank])
    expected_levels = {4} if mode == "plain" else {2, 4}
    if mode == "sample":
        assert set(stats.loss_per_level) <= expected_levels
    else:
        assert set(stats.loss_per_level) == expected_levels
    assert nested.rank == rank
    assert not any(p.requires_grad for p in nested.model.parameters())


def test_all_mode_gradient_is_weighted_sum_of_truncations() -> None:
    # One step of `all` equals an independent computation of sum_l c_l grad loss_l.
    nested = _nested()
    batch = next(_batches(5))
    weights = level_distribution(8, [2, 4, 8], 0.7)
    expected = torch.zeros_like(nested.factor("fc1")[0])
    for lv, c in weights.items():
        for p, _ in nested.parameters_with_rank_dim():
            p.requires_grad_(True)
            p.grad = None
        nested.set_rank(lv)
        _loss(nested.model, batch).backward()
        expected += c * nested.factor("fc1")[0].grad
    nested.set_rank(8)
    A0 = nested.factor("fc1")[0].detach().clone()
    cfg = LocalTrainConfig(steps=1, lr=1e-3, mode="all", own_weight=0.7)
    train_local(nested, 8, [2, 4, 8], itertools.repeat(batch), _loss, cfg, torch.Generator())
    # a first Adam step moves each coordinate by -lr * sign(g) (|m/sqrt(v)| = 1)
    step = nested.factor("fc1")[0].detach() - A0
    nz = expected.abs() > 1e-6
    torch.testing.assert_close(step[nz], -1e-3 * torch.sign(expected[nz]), rtol=1e-3, atol=1e-7)


def test_hetlora_regulariser_has_gradient_and_prunes() -> None:
    nested = _nested()
    for p, _ in nested.parameters_with_rank_dim():
        p.requires_grad_(True)
    reg = make_regulariser(lam=0.1, gamma=0.5)(nested, 8)
    reg.backward()
    A, B = nested.factor("fc1")
    assert A.grad is not None and B.grad is not None
    assert torch.count_nonzero(A.grad[4:8]) > 0 and torch.count_nonzero(B.grad[:, 4:8]) > 0
    assert torch.count_nonzero(A.grad[:4]) == 0  # only the tail [floor(gamma r), r) is pushed
    manual = sum(
        torch.linalg.vector_norm(nested.factor(n)[0][4:8])
        * torch.linalg.vector_norm(nested.factor(n)[1][:, 4:8])
        for n in nested.layers
    )
    torch.testing.assert_close(tail_norm(nested, 8, 0.5), manual)
    assert pruned_rank(8, before=1.0, after=0.5, gamma=0.5, min_rank=2) == 4
    assert pruned_rank(8, before=1.0, after=2.0, gamma=0.5, min_rank=2) == 8
    assert pruned_rank(2, before=1.0, after=0.5, gamma=0.5, min_rank=2) == 2
