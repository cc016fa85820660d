"""The contract every registered aggregation rule keeps, parametrized over the registry itself
(so a new rule is covered the moment it is registered, none can escape a hand-written list).

- shapes: bad updates are refused with the module named; the new global adapter has rank R
  and the global modules;
- order: the aggregate does not depend on the order the updates arrive in (compared on what
  the clients get next round: ``message``'s adapter product and base delta);
- downlink: a rank-r client's message holds rank-r factors and costs at least their bytes;
- state: ``update`` keeps the state's keys from round to round and leaves its input unchanged;
- sum form: a rule that declares ``sum_form`` aggregates from summed delta-form messages to
  the same adapter as from the updates themselves (docs/design.md §4.9).
"""

from __future__ import annotations

import pytest
import torch

from prelort.adapters import LoRAPair
from prelort.adapters.state import Adapter, adapter_num_bytes
from prelort.aggregation import RULES, ClientUpdate
from prelort.aggregation.base import AggregationRule, RuleOptions
from prelort.aggregation.sumform import apply_sums, client_sums

BUILTIN = sorted(name for name, cls in RULES.items() if cls.__module__.startswith("prelort."))
R, N_IN, N_OUT = 8, 5, 4


def _rule(name: str) -> AggregationRule:
    return RULES[name](RuleOptions(seed=3, round=2, generator=torch.Generator().manual_seed(0)))


def _ranks(name: str) -> list[int]:
    return [8, 8, 8] if name == "fedit" else [2, 8, 4]  # FedIT is homogeneous by definition


def _updates(name: str, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            {
                m: LoRAPair(torch.randn(r, N_IN, generator=g), torch.randn(N_OUT, r, generator=g))
                for m in "pq"
            },
            r,
            n,
            k,
        )
        for k, (r, n) in enumerate(zip(_ranks(name), [3, 1, 2], strict=True))
    ]


def _global(seed: int = 9) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoRAPair(torch.randn(R, N_IN, generator=g), 0.1 * torch.randn(N_OUT, R, generator=g)) for m in "pq"
    }


def test_the_registry_holds_every_method_rule() -> None:
    from prelort.federation.methods import METHODS

    assert {m.rule for m in METHODS.values()} <= set(RULES)
    assert len(BUILTIN) >= 10


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_updates_are_refused(name: str) -> None:
    rule, g = _rule(name), _global()
    bad = ClientUpdate({m: LoRAPair(torch.randn(4, N_IN), torch.randn(N_OUT, 4)) for m in "pq"}, 2, 1, 0)
    with pytest.raises(ValueError, match="expected rank 2"):
        rule.update(g, rule.init_state(g), [bad])
    wrong = ClientUpdate({"x": LoRAPair(torch.randn(2, N_IN), torch.randn(N_OUT, 2))}, 2, 1, 0)
    with pytest.raises(ValueError, match="modules differ"):
        rule.update(g, rule.init_state(g), [wrong])


def _next_round_model(rule: AggregationRule, adapter: Adapter, state: dict[str, torch.Tensor]) -> dict:
    """What a rank-R model built from the state is, as a dense W - W0 per module (float64)."""
    msg = rule.message(adapter, state, R)
    scale = rule.options.scale(R)
    out = {m: scale * (p.B.double() @ p.A.double()) for m, p in msg.adapter.items()}
    for m, d in (msg.base or {}).items():
        out[m] = out[m] + d.double()
    return out


@pytest.mark.parametrize("name", BUILTIN)
def test_aggregate_is_invariant_to_the_order_of_updates(name: str) -> None:
    g, ups = _global(), _updates(name)
    results = []
    for order in (ups, ups[::-1]):
        rule = _rule(name)
        adapter, state, _ = rule.update(g, rule.init_state(g), order)
        assert set(adapter) == set(g)
        assert all(p.A.shape == (R, N_IN) and p.B.shape == (N_OUT, R) for p in adapter.values())
        results.append(_next_round_model(rule, adapter, state))
    for m in g:
        torch.testing.assert_close(results[0][m], results[1][m], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BUILTIN)
def test_a_rank_r_client_receives_rank_r_factors(name: str) -> None:
    rule, g = _rule(name), _global()
    adapter, state, _ = rule.update(g, rule.init_state(g), _updates(name))
    for r in (2, 4, 8):
        msg = rule.message(adapter, state, r, client_id=1, round_=3)
        assert all(p.rank == r for p in msg.adapter.values())
        assert msg.num_bytes >= adapter_num_bytes(msg.adapter)


@pytest.mark.parametrize("name", BUILTIN)
def test_update_keeps_its_state_keys_and_leaves_its_input_alone(name: str) -> None:
    rule, g = _rule(name), _global()
    state0 = rule.init_state(g)
    adapter, state1, _ = rule.update(g, state0, _updates(name, seed=1))
    frozen = {k: v.clone() for k, v in state1.items()}
    _, state2, _ = rule.update(adapter, state1, _updates(name, seed=2))
    assert set(state2) == set(state1)
    assert all(torch.equal(state1[k], frozen[k]) for k in frozen)  # not updated in place


SUM_RULES = [n for n in BUILTIN if RULES[n].sum_form]


def test_the_sum_form_rules_are_the_ratio_of_sums_ones() -> None:
    assert set(SUM_RULES) == {"fedit", "prelort", "segment"}


@pytest.mark.parametrize("name", SUM_RULES)
def test_sum_form_gives_the_plain_aggregate(name: str) -> None:
    """Summed delta-form messages (weights n_k), divided row by row, then ``finish_sums``."""
    rule, g = _rule(name), _global()
    ups = _updates(name)
    sent = {u.client_id: {m: p.truncate(u.rank) for m, p in g.items()} for u in ups}
    total = None
    for u in ups:
        msg = client_sums(u, R, float(u.num_examples), reference=sent[u.client_id])
        total = msg if total is None else total + msg
    assert total is not None
    from_sums = rule.finish_sums(apply_sums(g, total, delta=True))
    plain, _, _ = rule.update(g, rule.init_state(g), ups)
    for m in g:
        torch.testing.assert_close(from_sums[m].A, plain[m].A, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_sums[m].B, plain[m].B, rtol=1e-5, atol=1e-5)
