"""Fair-comparison instrument: matched passes, stratified sampling, oracles, level weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.cli import main
from prelort.config import config_from_dict
from prelort.errors import ConfigError
from prelort.federation.methods import get_method
from prelort.federation.plan import build_plan, sample_stratified
from prelort.training.local import level_distribution

TINY = [
    "run.rounds=3",
    "run.clients_per_round=3",
    "run.eval_every=3",
    "clients.num_clients=6",
    "clients.levels=[2, 4, 8]",
    "train.steps=7",
    "train.batch_size=8",
    "synthetic.d_in=6",
    "synthetic.hidden=10",
    "synthetic.d_out=3",
    "synthetic.teacher_rank=8",
    "synthetic.min_examples=16",
    "synthetic.max_examples=32",
    "synthetic.test_examples=30",
]


def _run(tmp_path: Path, name: str, *sets: str) -> dict:
    out = tmp_path / name
    args = ["run", "--config", "configs/synthetic.toml", "--out", str(out), "--quiet"]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    assert main(args) == 0
    results: dict = json.loads((out / "results.json").read_text())
    return results


def test_matched_passes_prelort_all_and_segment_agree(tmp_path: Path) -> None:
    common = ['train.budget="passes"', 'train.nested_mode="all"']
    pre = _run(tmp_path, "prelort", 'run.method="prelort"', *common)
    seg = _run(tmp_path, "segment", 'run.method="segment"', *common)
    sampled = sum(len(r["clients"]) for r in pre["rounds"] if r["round"] > 0)
    assert pre["total_passes"] == sum(r["passes"] for r in pre["rounds"])
    # segment: every sampled client makes exactly train.steps passes
    assert seg["total_passes"] == 7 * sum(len(r["clients"]) for r in seg["rounds"] if r["round"] > 0)
    assert abs(pre["total_passes"] - seg["total_passes"]) <= sampled
    # with the "steps" budget the nested client makes |L_k| passes per step: 7 * (1, 2, 3)
    steps = _run(
        tmp_path, "prelort-steps", 'run.method="prelort"', 'train.budget="steps"', 'train.nested_mode="all"'
    )
    by_rank = {2: 7, 4: 14, 8: 21}
    for rec in steps["rounds"][1:]:
        assert rec["passes"] == sum(by_rank[steps["ranks"][k]] for k in rec["clients"])
        assert rec["examples"] == 7 * 8 * len(rec["clients"])  # steps x batch size


def test_local_steps_under_the_passes_budget() -> None:
    cfg = config_from_dict(
        {
            "clients": {"levels": [2, 4, 8, 16]},
            "train": {"steps": 10, "nested_mode": "all", "budget": "passes"},
        }
    )
    plan = build_plan(cfg)
    # |L_k| = 1, 2, 3, 4 -> round(10 / |L_k|) = 10, 5, 3, 2 (Python rounds 2.5 to even)
    assert [plan.local_steps(r) for r in (2, 4, 8, 16)] == [10, 5, 3, 2]
    sample = build_plan(config_from_dict({"train": {"steps": 10, "nested_mode": "sample"}}))
    assert sample.local_steps(16) == 10  # one pass per step already
    seg = build_plan(config_from_dict({"run": {"method": "segment"}, "train": {"steps": 10}}))
    assert seg.local_steps(16) == 10
    tiny = build_plan(config_from_dict({"train": {"steps": 1, "nested_mode": "all"}}))
    assert tiny.local_steps(16) == 1  # at least one step


@settings(max_examples=200, deadline=None)
@given(
    ranks=st.lists(st.sampled_from([1, 2, 4, 8, 16, 32]), min_size=1, max_size=30),
    per_round=st.integers(1, 30),
    seed=st.integers(0, 5),
    round_=st.integers(1, 50),
)
def test_stratified_sampling_covers_levels(ranks: list[int], per_round: int, seed: int, round_: int) -> None:
    per_round = min(per_round, len(ranks))
    chosen = sample_stratified(seed, round_, ranks, per_round)
    assert chosen == sorted(set(chosen)) and len(chosen) == per_round
    assert all(0 <= k < len(ranks) for k in chosen)
    levels = sorted(set(ranks), reverse=True)
    got = {ranks[k] for k in chosen}
    if per_round >= len(levels):
        assert got == set(levels)  # every level, every round
    else:
        assert got == set(levels[:per_round])  # the highest levels first
    assert sample_stratified(seed, round_, ranks, per_round) == chosen  # seeded: resume-safe


def test_stratified_is_the_plans_default_and_uniform_is_available() -> None:
    cfg = config_from_dict(
        {"clients": {"num_clients": 8, "levels": [2, 4, 8, 16]}, "run": {"clients_per_round": 4}}
    )
    plan = build_plan(cfg)
    for t in range(1, 30):
        assert {plan.ranks[k] for k in plan.sample(t)} == {2, 4, 8, 16}
    uni = build_plan(config_from_dict({"run": {"sampling": "uniform", "clients_per_round": 4}}))
    missing = [t for t in range(1, 60) if {uni.ranks[k] for k in uni.sample(t)} != {2, 4, 8, 16}]
    assert missing  # uniform sampling does miss levels: why stratified exists


def test_oracle_methods_train_every_client_at_one_level() -> None:
    plan = build_plan(config_from_dict({"run": {"method": "fedit-r4"}, "clients": {"levels": [2, 4, 8]}}))
    assert plan.ranks == (4,) * len(plan.ranks) and plan.method.family == "homogeneous"
    assert get_method("flora").family == "merged" and get_method("hetlora").family == "rank-limited"
    with pytest.raises(ConfigError, match=r"not in clients\.levels"):
        config_from_dict({"run": {"method": "fedit-r3"}, "clients": {"levels": [2, 4, 8]}})
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_dict({"run": {"method": "fedit-x"}})


def test_geometric_level_weights_by_hand() -> None:
    # levels 2, 4, 8 below rank 8: weights 1, 2, 4 over 7
    assert level_distribution(8, [2, 4, 8, 16], "geometric") == pytest.approx({2: 1 / 7, 4: 2 / 7, 8: 4 / 7})


def _states(factors: str, rounds: int) -> list:
    from prelort.config import load_config
    from prelort.federation.simulator import make_driver
    from prelort.workloads import build_workload

    sets = [*TINY, 'run.method="prelort"', f'train.factors="{factors}"', f"run.rounds={rounds}"]
    sets.append('aggregation.order="ownership"')  # a frozen A is what the importance order rotates
    cfg = load_config("configs/synthetic.toml", sets)
    states: list = []
    driver = make_driver(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
    start, records = driver.start()
    driver.run(start, records)
    return [start, *states]


def _same(a: dict, b: dict, factor: str) -> bool:
    return all(bool((getattr(a[n], factor) == getattr(b[n], factor)).all()) for n in a)


def test_b_only_never_changes_a() -> None:
    s = _states("b-only", 2)
    assert _same(s[0].adapter, s[2].adapter, "A") and not _same(s[0].adapter, s[2].adapter, "B")


def test_alternate_trains_b_on_odd_rounds_and_a_on_even_rounds() -> None:
    s = _states("alternate", 2)
    assert _same(s[0].adapter, s[1].adapter, "A") and not _same(s[0].adapter, s[1].adapter, "B")
    assert _same(s[1].adapter, s[2].adapter, "B") and not _same(s[1].adapter, s[2].adapter, "A")


def test_config_validation_imports_neither_torch_nor_peft() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from prelort.config import load_config\n"
        "from prelort.errors import ConfigError\n"
        "for bad in (['run.rounds=0'], ['train.lr=nan'], ['run.method=\"nope\"']):\n"
        "    try:\n"
        "        load_config('configs/synthetic.toml', bad)\n"
        "        raise SystemExit('accepted ' + str(bad))\n"
        "    except ConfigError:\n"
        "        pass\n"
        "load_config('configs/demo-bbc.toml')\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compare_reuses_only_runs_of_thesame_config() -> None:
    from prelort.config import same_config

    now = {"run": {"seed": 0, "rounds": 3, "sampling": "stratified"}, "train": {"lr": 0.1}}
    assert same_config({"run": {"seed": 0, "rounds": 3}, "train": {"lr": 0.1}}, now)  # older version
    assert not same_config({"run": {"seed": 0, "rounds": 4}}, now)
    assert not same_config({"run": {"seed": 0, "gone": 1}}, now)
    assert not same_config(None, now)
