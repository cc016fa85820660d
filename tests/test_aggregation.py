"""Aggregation rules against hand-computed and independently computed expectations."""

from __future__ import annotations

import pytest
import torch

from prelort.adapters import LoRAPair, Scaling
from prelort.aggregation import RULES, ClientUpdate, aggregate, get_rule
from prelort.aggregation.base import RuleOptions


def _pair(rank: int, fill_a: float, fill_b: float, n_in: int = 3, n_out: int = 2) -> LoRAPair:
    return LoRAPair(torch.full((rank, n_in), fill_a), torch.full((n_out, rank), fill_b))


def _random_updates(ranks: list[int], sizes: list[int], n_in: int = 5, n_out: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            {"m": LoRAPair(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))},
            r,
            n,
            k,
        )
        for k, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]


def test_registry_has_every_rule() -> None:
    assert {"fedit", "hetlora", "flexlora", "flora", "segment", "prelort"} <= set(RULES)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        get_rule("fedavg-typo")


def test_segment_hand_made_ranks_2_4_8_and_unowned_segment() -> None:
    # R = 16: levels {2,4,8,16}; clients of ranks 2, 4, 8 with n = 1, 2, 3; nobody owns [8, 16).
    old = _pair(16, 7.0, -7.0)
    updates = [
        ClientUpdate({"m": _pair(2, 1.0, 10.0)}, 2, 1),
        ClientUpdate({"m": _pair(4, 2.0, 20.0)}, 4, 2),
        ClientUpdate({"m": _pair(8, 3.0, 30.0)}, 8, 3),
    ]
    new = aggregate("segment", {"m": old}, updates).adapter["m"]
    # rows 0-1 owned by all: (1*1 + 2*2 + 3*3) / 6 = 14/6
    # rows 2-3 by ranks 4 and 8: (2*2 + 3*3) / 5 = 13/5
    # rows 4-7 only by rank 8: 3; rows 8-15 nobody: old value 7.
    expect_a = [14 / 6] * 2 + [13 / 5] * 2 + [3.0] * 4 + [7.0] * 8
    expect_b = [140 / 6] * 2 + [130 / 5] * 2 + [30.0] * 4 + [-7.0] * 8
    torch.testing.assert_close(new.A[:, 0], torch.tensor(expect_a))
    torch.testing.assert_close(new.B[0], torch.tensor(expect_b))
    assert new.A.shape == (16, 3) and new.B.shape == (2, 16)


def test_prelort_rule_is_segment() -> None:
    g = {"m": _pair(8, 0.5, 0.5, 5, 4)}
    ups = _random_updates([2, 4, 8], [3, 5, 7])
    a = aggregate("prelort", g, ups).adapter["m"]
    b = aggregate("segment", g, ups).adapter["m"]
    torch.testing.assert_close(a.A, b.A)
    torch.testing.assert_close(a.B, b.B)


def test_equal_ranks_segment_equals_fedit() -> None:
    g = {"m": LoRAPair(torch.randn(8, 5), torch.randn(4, 8))}
    ups = _random_updates([4, 4, 4], [1, 5, 9])
    seg = aggregate("segment", g, ups).adapter["m"]
    fed = aggregate("fedit", g, ups).adapter["m"]
    torch.testing.assert_close(seg.A, fed.A)
    torch.testing.assert_close(seg.B, fed.B)
    # and FedAvg itself: sum p_k A_k on the first 4 rows, rows 4.. untouched
    p = torch.tensor([1, 5, 9], dtype=torch.float32) / 15
    expect = sum(w * u.adapter["m"].A for w, u in zip(p, ups, strict=True))
    torch.testing.assert_close(fed.A[:4], expect)
    torch.testing.assert_close(fed.A[4:], g["m"].A[4:])


def test_fedit_rejects_mixed_ranks() -> None:
    g = {"m": LoRAPair(torch.randn(8, 5), torch.randn(4, 8))}
    with pytest.raises(ValueError, match="one rank"):
        aggregate("fedit", g, _random_updates([2, 4], [1, 1]))


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
def test_flora_merged_delta_is_exact_weighted_sum(kind: str) -> None:
    scaling = Scaling(kind, alpha=16.0, max_rank=8)  # type: ignore[arg-type]
    g = {"m": LoRAPair(torch.randn(8, 5), torch.zeros(4, 8))}
    sizes = [3, 10, 7]
    ups = _random_updates([2, 4, 8], sizes)
    res = aggregate("flora", g, ups, scaling=scaling, generator=torch.Generator().manual_seed(1))
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    expect = sum(
        float(w) * scaling(u.rank) * (u.adapter["m"].B.double() @ u.adapter["m"].A.double())
        for w, u in zip(p, ups, strict=True)
    )
    assert res.base_delta is not None
    torch.testing.assert_close(res.base_delta["m"].double(), expect, rtol=1e-5, atol=1e-6)
    # fresh adapter: B = 0 so the merged model is the whole change; stack bytes reported
    assert torch.count_nonzero(res.adapter["m"].B) == 0
    assert res.broadcast_bytes == (2 + 4 + 8) * (5 + 4) * 4


def test_flexlora_full_rank_reconstructs_delta() -> None:
    # R = 4 = min(m, n): the SVD at full rank is lossless.
    scaling = Scaling("per_rank", alpha=8.0, max_rank=4)
    g = {"m": LoRAPair(torch.randn(4, 6), torch.zeros(4, 4))}
    sizes = [2, 6]
    ups = _random_updates([2, 4], sizes, n_in=6, n_out=4)
    res = aggregate("flexlora", g, ups, scaling=scaling)
    p = torch.tensor(sizes, dtype=torch.float64) / 8
    dW = sum(
        float(w) * scaling(u.rank) * (u.adapter["m"].B.double() @ u.adapter["m"].A.double())
        for w, u in zip(p, ups, strict=True)
    )
    got = res.adapter["m"]
    torch.testing.assert_close(scaling(4) * (got.B.double() @ got.A.double()), dW, rtol=1e-5, atol=1e-6)
    # a rank-2 client receives the best rank-2 approximation (Eckart-Young), with its own scale
    rule = get_rule("flexlora", RuleOptions(scaling=scaling))
    down = rule.downlink(res.adapter, 2)["m"]
    U, S, Vh = torch.linalg.svd(dW)
    best2 = (U[:, :2] * S[:2]) @ Vh[:2]
    torch.testing.assert_close(scaling(2) * (down.B.double() @ down.A.double()), best2, rtol=1e-4, atol=1e-5)


def test_hetlora_sparsity_weights_and_zero_padding() -> None:
    g = {"m": LoRAPair(torch.ones(4, 3), torch.ones(2, 4))}
    a = LoRAPair(torch.eye(2, 3), torch.eye(2, 2))  # ||BA||_F = sqrt(2)
    b = LoRAPair(
        torch.eye(4, 3) * 2, torch.cat([torch.eye(2), torch.eye(2)], 1) * 2
    )  # BA = 4*[I 0] + 4*[0..]
    ups = [ClientUpdate({"m": a}, 2, 100, 0), ClientUpdate({"m": b}, 4, 1, 1)]
    res = aggregate("hetlora", g, ups)
    na = torch.linalg.matrix_norm(a.B @ a.A)
    nb = torch.linalg.matrix_norm(b.B @ b.A)
    pa, pb = float(na / (na + nb)), float(nb / (na + nb))
    assert res.info["m"] == pytest.approx([pa, pb])  # independent of n_k
    expect_a = pa * a.pad(4).A + pb * b.A
    torch.testing.assert_close(res.adapter["m"].A, expect_a)
    torch.testing.assert_close(res.adapter["m"].B, pa * a.pad(4).B + pb * b.B)


def test_hetlora_rows_no_client_holds_become_zero() -> None:
    g = {"m": LoRAPair(torch.ones(8, 3), torch.ones(2, 8))}
    ups = _random_updates([2, 4], [1, 1], n_in=3, n_out=2)
    res = aggregate("hetlora", g, ups).adapter["m"]
    assert torch.count_nonzero(res.A[4:]) == 0 and torch.count_nonzero(res.B[:, 4:]) == 0


@pytest.mark.parametrize("rule", ["segment", "hetlora", "flexlora", "flora", "prelort"])
def test_rules_reject_bad_shapes(rule: str) -> None:
    g = {"m": LoRAPair(torch.randn(8, 5), torch.randn(4, 8))}
    bad = ClientUpdate({"m": LoRAPair(torch.randn(4, 5), torch.randn(4, 4))}, 2, 1, 0)  # claims rank 2
    with pytest.raises(ValueError, match="expected rank 2"):
        aggregate(rule, g, [bad])
    wrong_name = ClientUpdate({"x": LoRAPair(torch.randn(2, 5), torch.randn(4, 2))}, 2, 1, 0)
    with pytest.raises(ValueError, match="modules differ"):
        aggregate(rule, g, [wrong_name])


@pytest.mark.parametrize("rule", ["segment", "hetlora", "flexlora", "flora", "prelort"])
def test_rules_invariant_to_client_order(rule: str) -> None:
    g = {"m": LoRAPair(torch.randn(8, 5), torch.zeros(4, 8))}
    ups = _random_updates([2, 8, 4], [3, 1, 2])
    a = aggregate(rule, g, ups, generator=torch.Generator().manual_seed(0))
    b = aggregate(rule, g, ups[::-1], generator=torch.Generator().manual_seed(0))
    if rule == "flora":
        assert a.base_delta is not None and b.base_delta is not None
        torch.testing.assert_close(a.base_delta["m"], b.base_delta["m"], rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(a.adapter["m"].B @ a.adapter["m"].A, b.adapter["m"].B @ b.adapter["m"].A)
