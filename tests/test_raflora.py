"""raFLoRA (arXiv 2602.13486) on hand-made and small random tensors, with expectations computed
independently of the rule: explicit loops over rank-one components, dense products and
torch's own SVD."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prelort.adapters import LoRAPair, Scaling
from prelort.aggregation import RULES, ClientUpdate, aggregate, get_rule
from prelort.aggregation.base import RuleOptions
from prelort.aggregation.raflora import RaFLoRA
from prelort.federation.methods import METHODS, get_method

ROOT = Path(__file__).resolve().parents[1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _updates(ranks: list[int], sizes: list[int], n_in: int, n_out: int, seed: int) -> list[ClientUpdate]:
    g = _gen(seed)
    return [
        ClientUpdate(
            {"m": LoRAPair(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))}, r, n, k
        )
        for k, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]


def _global(R: int, n_in: int, n_out: int, seed: int) -> dict[str, LoRAPair]:
    g = _gen(seed)
    return {"m": LoRAPair(torch.randn(R, n_in, generator=g), torch.randn(n_out, R, generator=g))}


def _expected(
    updates: list[ClientUpdate], glob: LoRAPair, scale: Callable[[int], float], R: int
) -> torch.Tensor:
    """The partition-wise weighted sum, written component by component: component i of client
    k belongs to the partition ending at the smallest client rank above i; its weight is n_k
    over the data of the clients whose rank reaches that end. Components no client holds come
    from the global adapter at scale s(R)."""
    ranks = sorted({u.rank for u in updates})
    out = torch.zeros(glob.B.shape[0], glob.A.shape[1], dtype=torch.float64)
    for u in updates:
        A, B = u.adapter["m"].A.double(), u.adapter["m"].B.double()
        for i in range(u.rank):
            end = min(r for r in ranks if r > i)
            owners = sum(v.num_examples for v in updates if v.rank >= end)
            out += (u.num_examples / owners) * scale(u.rank) * torch.outer(B[:, i], A[i])
    for i in range(max(ranks), R):
        out += scale(R) * torch.outer(glob.B[:, i].double(), glob.A[i].double())
    return out


def _product(pair: LoRAPair, s: float) -> torch.Tensor:
    return s * (pair.B.double() @ pair.A.double())


def _best(dense: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_registered_rule_and_method() -> None:
    assert RULES["raflora"] is RaFLoRA
    assert isinstance(get_rule("raflora"), RaFLoRA)
    assert "raflora" in METHODS and METHODS["raflora"].rule == "raflora"
    assert get_method("raflora").family == "rank-limited"
    assert not get_method("raflora").nested and not get_method("raflora").self_prune


def test_three_ranks_match_the_partition_formula() -> None:
    # R = 8, clients of ranks 2, 4, 8 (and a second rank-4 one); partitions [0,2) [2,4) [4,8)
    R, n_in, n_out = 8, 5, 4  # out = 4 <= R: the rank-R global adapter holds dW exactly
    scaling = Scaling("per_rank", alpha=16.0, max_rank=R)
    ups = _updates([2, 4, 8, 4], [5, 2, 3, 1], n_in, n_out, seed=1)
    glob = _global(R, n_in, n_out, seed=2)
    res = aggregate("raflora", glob, ups, scaling=scaling)
    expect = _expected(ups, glob["m"], scaling, R)
    torch.testing.assert_close(_product(res.adapter["m"], scaling(R)), expect, rtol=1e-5, atol=1e-5)
    assert res.adapter["m"].A.shape == (R, n_in) and res.adapter["m"].B.shape == (n_out, R)
    # owner shares rho_j: [0,2) all 11 examples, [2,4) ranks 4, 8, 4: 6/11, [4,8) rank 8: 3/11
    assert res.info["levels"] == [2.0, 4.0, 8.0]
    assert res.info["owner_share"] == pytest.approx([1.0, 6 / 11, 3 / 11])


def test_hand_made_component_only_high_rank_clients_own_is_not_shrunk() -> None:
    # R = 4, s = 1; a rank-2 client (n = 3) holds e0 e0^T + e1 e1^T, a rank-4 client (n = 1)
    # holds diag(1, 1, 5, 7). Partition [2, 4) belongs to the rank-4 client alone: weight 1.
    eye = torch.eye(4)
    low = ClientUpdate({"m": LoRAPair(eye[:2].clone(), eye[:, :2].clone())}, 2, 3, 0)
    high = ClientUpdate({"m": LoRAPair(eye.clone(), torch.diag(torch.tensor([1.0, 1.0, 5.0, 7.0])))}, 4, 1, 1)
    glob = {"m": LoRAPair(torch.zeros(4, 4), torch.zeros(4, 4))}
    got = aggregate("raflora", glob, [low, high]).adapter["m"]
    torch.testing.assert_close(got.B @ got.A, torch.diag(torch.tensor([1.0, 1.0, 5.0, 7.0])))
    # FlexLoRA's rank-agnostic weights (3/4, 1/4) shrink that partition by rho = 1/4
    flex = aggregate("flexlora", glob, [low, high]).adapter["m"]
    torch.testing.assert_close(flex.B @ flex.A, torch.diag(torch.tensor([1.0, 1.0, 5 / 4, 7 / 4])))


def test_no_rank_collapse_over_rounds_unlike_rank_agnostic_weights() -> None:
    # The paper's phenomenon: every client returns exactly what it received (its rank-r SVD
    # truncation). With FlexLoRA's weights the singular values beyond the smallest shared rank
    # fall by rho = (data of rank-4 clients) / N = 1/3 per round; with raFLoRA they stay.
    R, n, T = 4, 6, 5
    scaling = Scaling("per_rank", alpha=8.0, max_rank=R)
    g = _gen(3)
    U, _ = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64))
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    start = {"m": LoRAPair(V.T.float(), (U * sigma / scaling(R)).float())}
    ranks, sizes = [2, 2, 4], [3, 1, 2]
    rho = 2 / 6
    final: dict[str, torch.Tensor] = {}
    for name in ("raflora", "flexlora"):
        rule = get_rule(name, RuleOptions(scaling=scaling))
        glob = start
        for _ in range(T):
            ups = [
                ClientUpdate(rule.downlink(glob, r), r, size, k)
                for k, (r, size) in enumerate(zip(ranks, sizes, strict=True))
            ]
            glob = rule.aggregate(glob, ups).adapter
        values = torch.linalg.svdvals(_product(glob["m"], scaling(R)))  # 6 values, rank <= R
        assert values[R:].abs().max() < 1e-5
        final[name] = values[:R]
    torch.testing.assert_close(final["raflora"], sigma, rtol=1e-4, atol=1e-4)
    collapsed = torch.tensor([4.0, 3.0, 2.0 * rho**T, 1.0 * rho**T], dtype=torch.float64)
    torch.testing.assert_close(final["flexlora"], collapsed, rtol=1e-4, atol=1e-4)


def test_rank_r_downlink_is_the_best_rank_r_approximation() -> None:
    # out = 6 > R = 4: dW has rank up to 6, the global adapter keeps its best rank-4 part
    R, n_in, n_out = 4, 7, 6
    scaling = Scaling("rslora", alpha=4.0, max_rank=R)
    ups = _updates([1, 2, 4, 4], [2, 3, 1, 4], n_in, n_out, seed=4)
    glob = _global(R, n_in, n_out, seed=5)
    rule = get_rule("raflora", RuleOptions(scaling=scaling))
    res = rule.aggregate(glob, ups)
    dense = _expected(ups, glob["m"], scaling, R)
    torch.testing.assert_close(_product(res.adapter["m"], scaling(R)), _best(dense, R), rtol=1e-4, atol=1e-4)
    for r in (1, 2, 3, 4):
        down = rule.downlink(res.adapter, r)["m"]
        assert down.A.shape == (r, n_in) and down.B.shape == (n_out, r)
        torch.testing.assert_close(_product(down, scaling(r)), _best(dense, r), rtol=1e-4, atol=1e-4)


def test_single_client_and_equal_ranks_reduce_to_fedavg_of_updates() -> None:
    R, n_in, n_out = 4, 5, 3
    scaling = Scaling("per_rank", alpha=8.0, max_rank=R)
    glob = _global(R, n_in, n_out, seed=6)
    # one client of rank R: its own update
    (one,) = _updates([R], [7], n_in, n_out, seed=7)
    got = aggregate("raflora", glob, [one], scaling=scaling).adapter["m"]
    torch.testing.assert_close(
        _product(got, scaling(R)), _product(one.adapter["m"], scaling(R)), rtol=1e-5, atol=1e-5
    )
    # every client at rank R: sum_k (n_k / N) s(R) B_k A_k, which is also FlexLoRA's aggregate
    sizes = [2, 5, 1]
    ups = _updates([R] * 3, sizes, n_in, n_out, seed=8)
    expect = sum(
        (n / sum(sizes)) * _product(u.adapter["m"], scaling(R)) for n, u in zip(sizes, ups, strict=True)
    )
    got = aggregate("raflora", glob, ups, scaling=scaling).adapter["m"]
    flex = aggregate("flexlora", glob, ups, scaling=scaling).adapter["m"]
    torch.testing.assert_close(_product(got, scaling(R)), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_product(flex, scaling(R)), expect, rtol=1e-5, atol=1e-5)
    # every client at rank 2 < R: FedAvg of the updates plus the global's unowned components [2, R)
    ups = _updates([2] * 3, sizes, n_in, n_out, seed=9)
    g = glob["m"]
    tail = scaling(R) * (g.B[:, 2:].double() @ g.A[2:].double())
    expect = tail + sum(
        (n / sum(sizes)) * _product(u.adapter["m"], scaling(2)) for n, u in zip(sizes, ups, strict=True)
    )
    got = aggregate("raflora", glob, ups, scaling=scaling).adapter["m"]
    torch.testing.assert_close(_product(got, scaling(R)), expect, rtol=1e-5, atol=1e-5)


def test_relation_to_rb_lora() -> None:
    # every partition owned: the same aggregate as RB-LoRA; the top partition unowned: RB-LoRA
    # drops it (zero), raFLoRA keeps the global's components there
    R, n_in, n_out = 8, 5, 4
    scaling = Scaling("per_rank", alpha=16.0, max_rank=R)
    glob = _global(R, n_in, n_out, seed=10)
    for ranks, kept in (([2, 4, 8], 0), ([2, 4, 4], 4)):
        ups = _updates(ranks, [3, 1, 2], n_in, n_out, seed=11)
        ra = _product(aggregate("raflora", glob, ups, scaling=scaling).adapter["m"], scaling(R))
        rb = _product(aggregate("rb-lora", glob, ups, scaling=scaling).adapter["m"], scaling(R))
        g = glob["m"]
        tail = scaling(R) * (g.B[:, R - kept :].double() @ g.A[R - kept :].double())
        torch.testing.assert_close(ra, rb + tail, rtol=1e-5, atol=1e-5)  # kept = 0: empty tail


def test_synthetic_run_reports_every_rank_level(tmp_path: Path) -> None:
    from prelort.cli import main

    out = tmp_path / "raflora"
    small = [
        'run.method="raflora"',
        "run.rounds=2",
        "run.eval_every=2",
        "train.steps=2",
        "train.batch_size=8",
        "synthetic.hidden=12",
        "synthetic.min_examples=16",
        "synthetic.max_examples=32",
        "synthetic.test_examples=40",
    ]
    args = ["run", "--config", str(ROOT / "configs" / "synthetic.toml"), "--out", str(out), "--quiet"]
    for s in small:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "raflora" and res["family"] == "rank-limited"
    assert set(res["final"]["per_rank"]) == {"2", "4", "8", "16"}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in res["final"]["per_rank"].values())
