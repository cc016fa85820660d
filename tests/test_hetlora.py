"""HetLoRA (Cho et al., EMNLP 2024, §3): self-pruning rule, floor, regulariser, zero-padding.

Every expectation is computed by hand or independently (fractions, explicit formulas), not by
calling the code under test a second way.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_net
from prelort.adapters import LoRAPair, NestedLoRA, Scaling
from prelort.aggregation import ClientUpdate, aggregate
from prelort.training import LocalTrainConfig, train_local
from prelort.training.hetlora import make_regulariser, prune_point, pruned_rank, tail_norm

# ---------------------------------------------------------------- the pruning rule


@pytest.mark.parametrize(
    ("rank", "gamma", "floor", "expect"),
    [
        (16, 0.99, 0, 15),  # 15.84 -> 15: at gamma = 0.99 a prune drops one dimension
        (8, 0.99, 0, 7),  # 7.92 -> 7
        (1, 0.99, 0, 0),  # 0.99 -> 0 (pruned_rank's floor of 1 stops this)
        (8, 0.5, 0, 4),
        (10, 0.75, 0, 7),  # 7.5 -> 7
        (9, 0.75, 0, 6),  # 6.75 -> 6
        (100, 0.57, 0, 57),  # float 0.57 * 100 = 56.99999999999999; by hand 57
        (10, 0.7, 0, 7),  # float 7.000000000000001
        (4, 0.1, 0, 0),  # 0.4 -> 0
        (4, 0.1, 2, 2),  # the floor lifts the prune point
        (3, 0.5, 2, 2),  # 1.5 -> 1, lifted to 2
        (2, 0.99, 2, 2),  # at the floor: empty tail
        (2, 0.5, 4, 2),  # floor above the rank: capped at the rank (empty tail)
    ],
)
def test_prune_point_hand_table(rank: int, gamma: float, floor: int, expect: int) -> None:
    assert prune_point(rank, gamma, floor) == expect


def test_pruned_rank_hand_cases() -> None:
    # decreased tail norm: prune to floor(gamma r), never below the floor
    assert pruned_rank(16, before=1.0, after=0.5, gamma=0.99, min_rank=2) == 15
    assert pruned_rank(16, before=1.0, after=0.5, gamma=0.75, min_rank=2) == 12
    assert pruned_rank(3, before=1.0, after=0.5, gamma=0.5, min_rank=2) == 2  # 1 lifted to 2
    assert pruned_rank(2, before=1.0, after=0.5, gamma=0.99, min_rank=2) == 2  # at the floor
    assert pruned_rank(1, before=1.0, after=0.5, gamma=0.99, min_rank=0) == 1  # never below 1
    assert pruned_rank(4, before=1.0, after=0.5, gamma=0.1, min_rank=0) == 1  # 0 lifted to 1
    # not decreased (equal, larger or NaN): keep the rank
    assert pruned_rank(16, before=1.0, after=1.0, gamma=0.99, min_rank=2) == 16
    assert pruned_rank(16, before=1.0, after=2.0, gamma=0.99, min_rank=2) == 16
    assert pruned_rank(16, before=1.0, after=math.nan, gamma=0.99, min_rank=2) == 16
    # a rank already below the floor is left alone (pruning never raises a rank)
    assert pruned_rank(2, before=1.0, after=0.5, gamma=0.5, min_rank=4) == 2
    with pytest.raises(ValueError, match="resolved floor"):
        pruned_rank(16, before=1.0, after=0.5, gamma=0.99, min_rank=None)
    with pytest.raises(ValueError, match="positive"):
        pruned_rank(0, before=1.0, after=0.5, gamma=0.99, min_rank=1)


@pytest.mark.parametrize(
    ("gamma", "floor", "chain"),
    [
        (0.75, 2, [16, 12, 9, 6, 4, 3, 2]),  # 12, 9, 6.75, 4.5, 3, 2.25 floored; then 1.5 -> 2
        (0.75, 4, [16, 12, 9, 6, 4]),
        (0.99, 13, [16, 15, 14, 13]),
        (0.5, 1, [16, 8, 4, 2, 1]),
    ],
)
def test_repeated_pruning_chain_stops_at_the_floor(gamma: float, floor: int, chain: list[int]) -> None:
    ranks = [chain[0]]
    for _ in range(30):  # a tail norm that always decreases
        ranks.append(pruned_rank(ranks[-1], before=1.0, after=0.0, gamma=gamma, min_rank=floor))
    assert ranks[: len(chain)] == chain
    assert set(ranks[len(chain) :]) == {chain[-1]}


@settings(max_examples=300, deadline=None)
@given(
    rank=st.integers(1, 256),
    gamma_millis=st.integers(1, 999),
    floor=st.integers(0, 300),
    before=st.floats(0, 10, allow_nan=False),
    after=st.floats(0, 10, allow_nan=False),
)
def test_pruned_rank_never_below_the_floor(
    rank: int, gamma_millis: int, floor: int, before: float, after: float
) -> None:
    gamma = gamma_millis / 1000
    new = pruned_rank(rank, before, after, gamma, floor)
    eff_floor = max(floor, 1)
    assert 1 <= new <= rank
    assert new >= min(rank, eff_floor)  # never below the floor, unless the rank already is
    # independent computation with exact fractions: the decimal gamma, floored, at most r - 1
    hand = min(math.floor(Fraction(gamma_millis, 1000) * rank), rank - 1)
    target = max(hand, eff_floor)
    if after < before and target < rank:
        assert new == target
    else:
        assert new == rank


@settings(max_examples=100, deadline=None)
@given(rank=st.integers(1, 128), gamma_millis=st.integers(1, 999), floor=st.integers(0, 140))
def test_pruning_to_exhaustion_ends_at_the_floor(rank: int, gamma_millis: int, floor: int) -> None:
    gamma, r, seen = gamma_millis / 1000, rank, [rank]
    for _ in range(rank + 1):  # each prune removes at least one dimension
        r = pruned_rank(r, before=1.0, after=0.0, gamma=gamma, min_rank=floor)
        seen.append(r)
    assert seen[-1] == (rank if rank <= max(floor, 1) else max(floor, 1))
    assert all(b <= a for a, b in itertools.pairwise(seen))


# ---------------------------------------------------------------- the regulariser


R = 6  # adapter rank held by the tiny model; the client trains rank 4 < R


def _hand_nested() -> NestedLoRA:
    """fc1 (6 -> 10) and fc2 (10 -> 10) with hand-made tail rows 2 and 3, junk elsewhere.

    With rank 4 and gamma 0.5 the tail is rows [2, 4):
      fc1: A rows (3, 0, ...), (0, 4, ...)            -> ||A_t|| = 5, ||A[3]|| = 4
           B columns (1, 2, 2, 0...), (0, 0, 0, 4, 0...) -> ||B_t|| = 5, ||B[:, 3]|| = 4
      fc2: A row 2 = (1, 0, ...), row 3 = 0              -> ||A_t|| = 1, ||A[3]|| = 0
           B column 2 = (0, 1, 0...), column 3 = 0       -> ||B_t|| = 1, ||B[:, 3]|| = 0
    Rows 0-1 (the head) and 4-5 (beyond the client's rank) hold large values that must not
    count.
    """
    nested = NestedLoRA(tiny_net(0), ["fc1", "fc2"], Scaling("fixed", 16.0, R))
    shapes = nested.shapes()
    adapter = {}
    for name, (n_out, n_in) in shapes.items():
        A = torch.zeros(R, n_in)
        B = torch.zeros(n_out, R)
        for r in (0, 1, 4, 5):
            A[r] = 100.0 + r
            B[:, r] = -50.0 - r
        adapter[name] = LoRAPair(A, B)
    A1, B1 = adapter["fc1"].A, adapter["fc1"].B
    A1[2, 0], A1[3, 1] = 3.0, 4.0
    B1[:3, 2] = torch.tensor([1.0, 2.0, 2.0])
    B1[3, 3] = 4.0
    A2, B2 = adapter["fc2"].A, adapter["fc2"].B
    A2[2, 0] = 1.0
    B2[1, 2] = 1.0
    nested.set_adapter(adapter)
    return nested


def test_tail_norm_and_regulariser_match_hand_values() -> None:
    nested = _hand_nested()
    # paper's tail [floor(0.5 * 4), 4) = [2, 4): fc1 5 * 5 + fc2 1 * 1 = 26
    torch.testing.assert_close(tail_norm(nested, 4, 0.5), torch.tensor(26.0))
    torch.testing.assert_close(make_regulariser(0.1, 0.5)(nested, 4), torch.tensor(2.6))
    # floor-aware tail starting at the floor 3: row 3 only: fc1 4 * 4 + fc2 0 * 0 = 16
    torch.testing.assert_close(tail_norm(nested, 4, 0.5, min_rank=3), torch.tensor(16.0))
    # a client at the floor has an empty tail: no penalty
    assert float(tail_norm(nested, 4, 0.5, min_rank=4)) == 0.0
    assert float(make_regulariser(0.1, 0.5, min_rank=4)(nested, 4)) == 0.0
    # gamma = 0.99 at rank 4: the tail is row 3 alone (floor(3.96) = 3): 16 again
    torch.testing.assert_close(tail_norm(nested, 4, 0.99), torch.tensor(16.0))


def test_regulariser_gradient_matches_hand_values() -> None:
    # d/dA_t (||A_t|| ||B_t||) = ||B_t|| / ||A_t|| * A_t; here ||B_t|| = ||A_t|| in both modules,
    # so the gradient is lam * A_t (and lam * B_t for B), and exactly zero outside the tail.
    nested = _hand_nested()
    for p, _ in nested.parameters_with_rank_dim():
        p.requires_grad_(True)
    lam = 0.1
    make_regulariser(lam, 0.5)(nested, 4).backward()
    for name in ("fc1", "fc2"):
        A, B = nested.factor(name)
        assert A.grad is not None and B.grad is not None
        torch.testing.assert_close(A.grad[2:4], lam * A.detach()[2:4])
        torch.testing.assert_close(B.grad[:, 2:4], lam * B.detach()[:, 2:4])
        assert torch.count_nonzero(A.grad[:2]) == 0 and torch.count_nonzero(A.grad[4:]) == 0
        assert torch.count_nonzero(B.grad[:, :2]) == 0 and torch.count_nonzero(B.grad[:, 4:]) == 0


# ---------------------------------------------------------------- aggregation


def test_sparsity_weights_use_the_applied_update_s_r_B_A() -> None:
    # ||B_a A_a||_F = ||B_b A_b||_F = 2, ranks 1 and 2.
    a = LoRAPair(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]]))  # B A = diag(2, 0)
    b = LoRAPair(torch.eye(2), math.sqrt(2) * torch.eye(2))  # B A = sqrt(2) I
    g = {"m": LoRAPair(torch.full((2, 2), 9.0), torch.full((2, 2), 9.0))}
    ups = [ClientUpdate({"m": a}, 1, 1, 0), ClientUpdate({"m": b}, 2, 50, 1)]
    # fixed scaling (or none): equal norms, equal weights, whatever n_k
    res = aggregate("hetlora", g, ups, scaling=Scaling("fixed", 4.0, 2))
    assert res.info["m"] == pytest.approx([0.5, 0.5])
    # per_rank s(r) = 4 / r: ||s B A|| = 8 and 4 -> weights 2/3, 1/3
    res = aggregate("hetlora", g, ups, scaling=Scaling("per_rank", 4.0, 2))
    assert res.info["m"] == pytest.approx([2 / 3, 1 / 3])
    # zero-padded average: A = 2/3 [[1, 0], [0, 0]] + 1/3 I ; B = 2/3 diag(2, 0) + 1/3 sqrt(2) I
    r2 = math.sqrt(2)
    torch.testing.assert_close(res.adapter["m"].A, torch.tensor([[1.0, 0.0], [0.0, 1 / 3]]))
    torch.testing.assert_close(res.adapter["m"].B, torch.tensor([[4 / 3 + r2 / 3, 0.0], [0.0, r2 / 3]]))


# ---------------------------------------------------------------- zero-padding collapse


def test_rows_zero_in_both_factors_get_zero_gradient() -> None:
    """Rank row r with A[r] = 0 and B[:, r] = 0 is a stationary point of any loss through B A.

    y = B A x, h = A x:  dL/dB[:, r] = sum (dL/dy) h_r = 0 since h_r = A[r] x = 0, and
    dL/dA[r] = sum (B[:, r]^T dL/dy) x^T = 0 since B[:, r] = 0. The zero-padded aggregate
    leaves exactly such rows where no client of the round has rank > r, so they never train
    again; this is why the benchmarks sample every rank level every round (stratified).
    """
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 5, generator=g)
    B = torch.randn(3, 4, generator=g)
    A[2:], B[:, 2:] = 0.0, 0.0
    A.requires_grad_(True)
    B.requires_grad_(True)
    x, y = torch.randn(7, 5, generator=g), torch.randn(7, 3, generator=g)
    loss = torch.mean((torch.tanh(x @ (B @ A).T) - y) ** 2)
    loss.backward()
    assert A.grad is not None and B.grad is not None
    assert torch.count_nonzero(A.grad[2:]) == 0 and torch.count_nonzero(B.grad[:, 2:]) == 0
    assert torch.count_nonzero(A.grad[:2]) > 0 and torch.count_nonzero(B.grad[:, :2]) > 0

    # contrast: a row zero in A only is not stationary (its A row gets B[:, r]^T dL/dy x^T)
    A2 = A.detach().clone().requires_grad_(True)
    B2 = B.detach().clone()
    B2[:, 2:] = torch.randn(3, 2, generator=g)
    B2.requires_grad_(True)
    torch.mean((torch.tanh(x @ (B2 @ A2).T) - y) ** 2).backward()
    assert A2.grad is not None and torch.count_nonzero(A2.grad[2:]) > 0


def test_unowned_rows_stay_dead_through_local_training() -> None:
    """After a round whose clients have ranks 2 and 4, rows 4..7 of an R = 8 adapter are zero;
    a rank-8 client then trains (AdamW with weight decay, plus the tail regulariser) and
    leaves them exactly zero, while its owned rows move."""
    Rmax = 8
    nested = NestedLoRA(tiny_net(0), ["fc1", "fc2"], Scaling("fixed", 16.0, Rmax))
    shapes = nested.shapes()
    g = torch.Generator().manual_seed(3)

    def update(rank: int, k: int) -> ClientUpdate:
        pairs = {
            n: LoRAPair(
                torch.randn(rank, s[1], generator=g) * 0.3, torch.randn(s[0], rank, generator=g) * 0.3
            )
            for n, s in shapes.items()
        }
        return ClientUpdate(pairs, rank, 10, k)

    start = {n: LoRAPair(torch.ones(Rmax, s[1]), torch.ones(s[0], Rmax)) for n, s in shapes.items()}
    global_ = aggregate("hetlora", start, [update(2, 0), update(4, 1)]).adapter
    for pair in global_.values():
        assert torch.count_nonzero(pair.A[4:]) == 0 and torch.count_nonzero(pair.B[:, 4:]) == 0

    nested.set_adapter(global_)
    nested.set_rank(Rmax)
    before = nested.get_adapter(Rmax)

    def batches():
        bg = torch.Generator().manual_seed(1)
        while True:
            x = torch.randn(16, 6, generator=bg)
            yield x, torch.sin(x[:, :4] * 3)

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return torch.mean((model(x) - y) ** 2)

    cfg = LocalTrainConfig(steps=5, lr=1e-2, weight_decay=0.1, mode="plain")
    train_local(nested, Rmax, [Rmax], batches(), loss, cfg, torch.Generator(), make_regulariser(0.1, 0.5))
    after = nested.get_adapter(Rmax)
    for name in after:
        assert torch.count_nonzero(after[name].A[4:]) == 0
        assert torch.count_nonzero(after[name].B[:, 4:]) == 0
        assert not torch.equal(after[name].A[:4], before[name].A[:4])
