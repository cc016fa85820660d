"""Importance order of the segment-wise rules (aggregation/importance.py, docs/design.md §4.2b).

Expectations come from a dense SVD of B A computed here, never from the code under test.
"""

from __future__ import annotations

import pytest
import torch

from prelort.adapters.state import LoRAPair
from prelort.aggregation import ClientUpdate, RuleOptions, get_rule
from prelort.aggregation.importance import importance_order, importance_order_pair
from prelort.aggregation.segment import segment_average
from prelort.aggregation.sumform import apply_sums, client_sums, zero_sums


def _pair(gen: torch.Generator, out: int, inp: int, rank: int) -> LoRAPair:
    return LoRAPair(
        torch.randn(rank, inp, generator=gen, dtype=torch.float64),
        torch.randn(out, rank, generator=gen, dtype=torch.float64),
    )


def _best_rank_r(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("split", ["b", "balanced"])
@pytest.mark.parametrize(("out", "inp", "rank"), [(12, 9, 6), (20, 30, 8), (5, 40, 8), (40, 3, 6)])
def test_product_kept_and_every_prefix_is_the_best_rank_r_approximation(
    split: str, out: int, inp: int, rank: int
) -> None:
    gen = torch.Generator().manual_seed(out * 100 + inp)
    pair = _pair(gen, out, inp, rank)
    full = pair.B @ pair.A
    new = importance_order_pair(pair, split)  # type: ignore[arg-type]
    assert new.A.shape == pair.A.shape and new.B.shape == pair.B.shape
    torch.testing.assert_close(new.B @ new.A, full, rtol=1e-10, atol=1e-10)
    for r in range(1, rank + 1):
        prefix = new.B[:, :r] @ new.A[:r]
        torch.testing.assert_close(prefix, _best_rank_r(full, r), rtol=1e-8, atol=1e-8)
    # the ownership order of random factors is not importance order: the rank-1 prefix is worse
    err_before = torch.linalg.norm(pair.B[:, :1] @ pair.A[:1] - full)
    err_after = torch.linalg.norm(new.B[:, :1] @ new.A[:1] - full)
    assert err_after < err_before


def test_splits_share_the_spectrum_as_documented() -> None:
    gen = torch.Generator().manual_seed(3)
    pair = _pair(gen, 15, 11, 5)
    S = torch.linalg.svdvals(pair.B @ pair.A)[:5]
    b = importance_order_pair(pair, "b")
    bal = importance_order_pair(pair, "balanced")
    # "b": orthonormal rows of A, column norms of B are the singular values
    torch.testing.assert_close(b.A @ b.A.T, torch.eye(5, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.B.norm(dim=0), S, rtol=1e-10, atol=1e-10)
    # "balanced": ||a_i|| = ||b_i|| = sqrt(s_i)
    torch.testing.assert_close(bal.A.norm(dim=1), S.sqrt(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bal.B.norm(dim=0), S.sqrt(), rtol=1e-10, atol=1e-10)


def test_rank_deficient_product_keeps_trainable_tail() -> None:
    """out < R: dimensions beyond the product's rank get B' = 0 and a non-zero A row."""
    gen = torch.Generator().manual_seed(4)
    pair = _pair(gen, 3, 10, 6)
    new = importance_order_pair(pair, "balanced")
    torch.testing.assert_close(new.B @ new.A, pair.B @ pair.A, rtol=1e-10, atol=1e-10)
    assert torch.all(new.B[:, 3:] == 0)
    assert torch.all(new.A[3:].norm(dim=1) > 0)


def _updates(gen: torch.Generator) -> tuple[dict[str, LoRAPair], list[ClientUpdate]]:
    shapes = {"m1": (7, 9), "m2": (6, 5)}
    g = {name: _pair(gen, o, i, 8) for name, (o, i) in shapes.items()}
    ups = []
    for k, (rank, n) in enumerate([(2, 10), (4, 30), (8, 20), (8, 5)]):
        adapter = {name: _pair(gen, o, i, rank) for name, (o, i) in shapes.items()}
        ups.append(ClientUpdate(adapter, rank, n, client_id=k))
    return g, ups


@pytest.mark.parametrize("rule_name", ["segment", "prelort"])
def test_round_order_is_the_segment_average_reordered(rule_name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    g, ups = _updates(gen)
    plain = get_rule(rule_name).aggregate(g, ups).adapter
    ordered = get_rule(rule_name, RuleOptions(order="round")).aggregate(g, ups).adapter
    for name in g:
        # the ownership-order rule is the per-row weighted average, computed here by hand
        rows = []
        for i in range(8):
            owners = [u for u in ups if u.rank > i]
            w = torch.tensor([float(u.num_examples) for u in owners], dtype=torch.float64)
            a = sum(wk * u.adapter[name].A[i] for wk, u in zip(w, owners, strict=True)) / w.sum()
            rows.append(a)
        torch.testing.assert_close(plain[name].A, torch.stack(rows))
        full = plain[name].B.double() @ plain[name].A.double()
        torch.testing.assert_close(
            ordered[name].B.double() @ ordered[name].A.double(), full, rtol=1e-5, atol=1e-5
        )
        for r in (2, 4, 8):
            prefix = ordered[name].B[:, :r].double() @ ordered[name].A[:r].double()
            torch.testing.assert_close(prefix, _best_rank_r(full, r), rtol=1e-4, atol=1e-4)


def test_sum_form_gives_the_plain_form() -> None:
    """Under secure aggregation the server has only the sums: apply_sums then finish_sums must
    equal the plain rule's aggregate."""
    gen = torch.Generator().manual_seed(6)
    g, ups = _updates(gen)
    rule = get_rule("prelort", RuleOptions(order="round"))
    total = zero_sums(g)
    for u in ups:
        total = total + client_sums(u, 8, float(u.num_examples))
    from_sums = rule.finish_sums(apply_sums(g, total))
    plain = rule.aggregate(g, ups).adapter
    for name in g:
        torch.testing.assert_close(from_sums[name].A, plain[name].A, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_sums[name].B, plain[name].B, rtol=1e-5, atol=1e-5)


def test_export_order_changes_only_what_evaluation_and_export_take() -> None:
    gen = torch.Generator().manual_seed(7)
    g, ups = _updates(gen)
    rule = get_rule("segment", RuleOptions(order="export"))
    state = rule.aggregate(g, ups).adapter
    plain = segment_average(g, ups)
    for name in g:  # the state is the ownership-order average
        torch.testing.assert_close(state[name].A, plain[name].A)
    sent = rule.downlink(state, 4, client_id=1, round_=2)  # a client: the plain prefix
    for name in g:
        torch.testing.assert_close(sent[name].A, state[name].A[:4])
    evaluated = rule.downlink(state, 4)  # evaluation / export: the best rank-4 part
    ordered = importance_order(state)
    for name in g:
        full = state[name].B.double() @ state[name].A.double()
        got = evaluated[name].B.double() @ evaluated[name].A.double()
        torch.testing.assert_close(got, _best_rank_r(full, 4), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(evaluated[name].A, ordered[name].A[:4])


def test_order_is_refused_for_rules_without_it() -> None:
    from prelort.config import load_config
    from prelort.errors import ConfigError

    with pytest.raises(ConfigError, match=r"aggregation\.order"):
        load_config(None, ['run.method="flexlora"', 'aggregation.order="round"'])
    cfg = load_config(None, ['run.method="segment"', 'aggregation.order="round"'])
    assert cfg.aggregation.order == "round"


def test_prelort_defaults_and_the_literal_reading() -> None:
    from prelort.config import load_config
    from prelort.federation.plan import build_plan

    new = build_plan(load_config(None, ['run.method="prelort"', "train.own_weight=0.5"]))
    assert new.order == "round" and new.make_rule().options.order == "round"
    assert new.local_config(8, 1).mode == "sample" and new.local_config(8, 1).own_weight == 0.5
    lit = build_plan(
        load_config(None, ['run.method="prelort-literal"', "train.own_weight=0.5", 'train.nested_mode="all"'])
    )
    assert lit.order == "ownership" and lit.make_rule().options.order == "ownership"
    cfg = lit.local_config(8, 3)
    assert (cfg.mode, cfg.own_weight, cfg.distill) == ("sample", 0.7, 0.0)
    assert lit.local_steps(8) == lit.cfg.train.steps
    assert build_plan(load_config(None, ['run.method="segment"'])).order == "ownership"


def test_reuse_ignores_only_the_keys_a_method_never_reads() -> None:
    from prelort.config import config_to_dict, load_config, same_config
    from prelort.federation.methods import unused_keys

    for method, reusable in (("flexlora", True), ("segment", True), ("prelort", False)):
        stored = config_to_dict(load_config(None, [f'run.method="{method}"', "train.own_weight=0.7"]))
        now = config_to_dict(load_config(None, [f'run.method="{method}"', "train.own_weight=0.9"]))
        assert same_config(stored, now, unused_keys(method)) is reusable
        assert not same_config(stored, now)  # without the method's unused keys: a mismatch
    stored = config_to_dict(load_config(None, ['run.method="flexlora"', "train.lr=0.01"]))
    now = config_to_dict(load_config(None, ['run.method="flexlora"', "train.lr=0.02"]))
    assert not same_config(stored, now, unused_keys("flexlora"))


def test_results_record_the_resolved_order() -> None:
    from prelort.config import load_config
    from prelort.federation.simulator import run_simulation
    from prelort.workloads import build_workload

    sets = ["run.rounds=1", "run.eval_every=1", "synthetic.test_examples=64"]
    for method, order in (("prelort", "round"), ("segment", "ownership"), ("prelort-literal", "ownership")):
        cfg = load_config("configs/synthetic.toml", [*sets, f'run.method="{method}"'])
        res = run_simulation(cfg, build_workload(cfg))
        assert res["resolved"]["aggregation.order"] == order
    cfg = load_config("configs/synthetic.toml", [*sets, 'run.method="flexlora"'])
    assert "resolved" not in run_simulation(cfg, build_workload(cfg))
