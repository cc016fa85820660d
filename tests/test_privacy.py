"""Privacy (issue #12): the sum form of the segment-wise rule, client-level differential
privacy (clipping, calibrated noise, accounting) and the config's ``[privacy]`` section."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.adapters import LoRAPair
from prelort.aggregation import ClientUpdate, aggregate
from prelort.aggregation.segment import segment_average
from prelort.aggregation.sumform import (
    RowSums,
    apply_sums,
    client_segment_pieces,
    client_sums,
    padded_upload_bytes,
    segment_layout_average,
    segmented_upload_bytes,
    sum_form_average,
    zero_sums,
)
from prelort.config import Config, config_to_dict, load_config
from prelort.federation import run_simulation
from prelort.federation.plan import build_plan
from prelort.federation.privacy import (
    change_norm,
    clip_update,
    epsilon,
    owner_counts,
    privatize,
    sent_rows,
)
from prelort.workloads import build_workload

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "configs" / "synthetic.toml"


def _pair(rank: int, fill_a: float, fill_b: float, n_in: int = 3, n_out: int = 2) -> LoRAPair:
    return LoRAPair(torch.full((rank, n_in), fill_a), torch.full((n_out, rank), fill_b))


def _random_updates(
    ranks: list[int], sizes: list[int], shapes: dict[str, tuple[int, int]], seed: int = 0
) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            {
                name: LoRAPair(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))
                for name, (n_out, n_in) in shapes.items()
            },
            r,
            n,
            k,
        )
        for k, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]


def _close(a: dict[str, LoRAPair], b: dict[str, LoRAPair], atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name].A, b[name].A, atol=atol, rtol=0)
        torch.testing.assert_close(a[name].B, b[name].B, atol=atol, rtol=0)


# -- 1. the sum form ---------------------------------------------------------------------------
def test_sum_form_hand_made_ranks_2_4_8_and_unowned_rows_kept() -> None:
    # the hand-made case of test_segment_hand_made_ranks_2_4_8_and_unowned_segment, as messages
    old = {"m": _pair(16, 7.0, -7.0)}
    updates = [
        ClientUpdate({"m": _pair(2, 1.0, 10.0)}, 2, 1),
        ClientUpdate({"m": _pair(4, 2.0, 20.0)}, 4, 2),
        ClientUpdate({"m": _pair(8, 3.0, 30.0)}, 8, 3),
    ]
    # client 1's message: 2 * A_k in rows 0-3, zeros below; weights 2 for rows 0-3, 0 after
    msg = client_sums(updates[1], 16, 2.0)
    assert msg.factors["m"].A.shape == (16, 3) and msg.factors["m"].B.shape == (2, 16)
    assert msg.factors["m"].A[:, 0].tolist() == [4.0] * 4 + [0.0] * 12
    assert msg.factors["m"].B[0].tolist() == [40.0] * 4 + [0.0] * 12
    assert msg.weight.tolist() == [2.0] * 4 + [0.0] * 12
    total = sum((client_sums(u, 16, float(u.num_examples)) for u in updates), zero_sums(old))
    assert total.weight.tolist() == [6.0] * 2 + [5.0] * 2 + [3.0] * 4 + [0.0] * 8
    new = apply_sums(old, total)["m"]
    expect_a = [14 / 6] * 2 + [13 / 5] * 2 + [3.0] * 4 + [7.0] * 8
    expect_b = [140 / 6] * 2 + [130 / 5] * 2 + [30.0] * 4 + [-7.0] * 8
    torch.testing.assert_close(new.A[:, 0], torch.tensor(expect_a))
    torch.testing.assert_close(new.B[0], torch.tensor(expect_b))
    # the segment layout gives the same, and so does the delta form (messages of changes)
    _close(segment_layout_average(old, updates, [2, 4, 8, 16]), {"m": new})
    sent = {"m": _pair(16, 0.5, -0.25)}
    delta_total = sum(
        (client_sums(u, 16, float(u.num_examples), reference=sent) for u in updates), zero_sums(old)
    )
    by_delta = apply_sums(sent, delta_total, delta=True)["m"]
    owned = torch.arange(16) < 8  # rows nobody owned keep the old (here: sent) value
    torch.testing.assert_close(by_delta.A, torch.where(owned[:, None], new.A, sent["m"].A))
    torch.testing.assert_close(by_delta.B, torch.where(owned[None, :], new.B, sent["m"].B))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([2, 4, 8]), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
def test_sum_form_equals_segment_rule_on_random_inputs(ranks: list[int], seed: int) -> None:
    shapes = {"a": (4, 5), "b": (3, 2)}
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(1, 300, (len(ranks),), generator=gen)]
    updates = _random_updates(ranks, sizes, shapes, seed)
    glob = {
        name: LoRAPair(torch.randn(8, n_in, generator=gen), torch.randn(n_out, 8, generator=gen))
        for name, (n_out, n_in) in shapes.items()
    }
    expect = segment_average(glob, updates)
    _close(sum_form_average(glob, updates), expect, atol=1e-5)
    _close(segment_layout_average(glob, updates, [2, 4, 8]), expect, atol=1e-5)
    _close(aggregate("prelort", glob, updates).adapter, expect, atol=0)
    # the wire layout round-trips
    msg = client_sums(updates[0], 8, 3.0)
    back = RowSums.from_arrays(msg.to_arrays(), shapes)
    assert torch.equal(back.weight, msg.weight)
    assert all(torch.equal(back.factors[n].A, msg.factors[n].A) for n in shapes)


def test_upload_bytes_of_the_two_layouts() -> None:
    # one module 6 -> 10 (in 6, out 10), R = 8; ranks 2, 4, 8
    glob = {"m": LoRAPair(torch.zeros(8, 6), torch.zeros(10, 8))}
    ups = _random_updates([2, 4, 8], [1, 1, 1], {"m": (10, 6)})
    assert padded_upload_bytes(glob) == 4 * (8 * 16 + 8)  # every client, whatever its rank
    assert [segmented_upload_bytes(u, [2, 4, 8]) for u in ups] == [
        4 * (2 * 16 + 1),
        4 * (4 * 16 + 2),
        4 * (8 * 16 + 3),
    ]
    assert sorted(client_segment_pieces(ups[1], [2, 4, 8], 1.0)) == [0, 1]


# -- 2. client-level differential privacy --------------------------------------------------------
SMALL = [
    "run.rounds=2",
    "run.clients_per_round=3",
    "run.eval_every=1",
    "clients.num_clients=6",
    "clients.levels=[2, 4, 8]",
    "synthetic.hidden=12",
    "synthetic.test_examples=60",
    "train.steps=2",
]
DP = ["privacy.clip=0.5", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5", "privacy.noise_seed=3"]


def _cfg(extra: list[str]) -> Config:
    return load_config(str(SYNTHETIC), [*SMALL, *extra])


def test_clipping_by_hand() -> None:
    sent = {
        "a": LoRAPair(torch.zeros(4, 2), torch.zeros(3, 4)),
        "b": LoRAPair(torch.ones(4, 1), torch.ones(1, 4)),
    }
    # a rank-2 client moved a.A[0, 0] by 3 and b.B[0, 1] by 4: ||change|| = 5 over both modules
    a = LoRAPair(torch.zeros(2, 2), torch.zeros(3, 2))
    a.A[0, 0] = 3.0
    b = LoRAPair(torch.ones(2, 1), torch.ones(1, 2))
    b.B[0, 1] = 5.0
    trained = {"a": a, "b": b}
    assert change_norm(sent, trained) == pytest.approx(5.0)
    clipped = clip_update(sent, trained, 1.0)  # scaled by 1/5
    assert clipped["a"].A[0, 0].item() == pytest.approx(0.6)
    assert clipped["b"].B[0, 1].item() == pytest.approx(1.0 + 0.8)
    assert clipped["b"].A.tolist() == [[1.0], [1.0]]  # unchanged coordinates stay
    assert change_norm(sent, clipped) == pytest.approx(1.0)
    assert clip_update(sent, trained, 5.5) is trained  # within the bound: untouched


def test_noise_std_per_segment_is_calibrated() -> None:
    # 4 owners of rows 0-1, 2 of rows 2-3, 1 of rows 4-7, none of 8-15 (levels 2, 4, 8, 16)
    counts = owner_counts([2, 4, 8, 8], 16, 16)
    assert counts.tolist() == [4.0] * 2 + [3.0] * 2 + [2.0] * 4 + [0.0] * 8
    assert owner_counts([2, 4, 8, 8], 16, 4).tolist() == [4.0] * 2 + [3.0] * 2 + [0.0] * 12
    glob = {"m": LoRAPair(torch.zeros(16, 400), torch.zeros(300, 16))}
    zero = zero_sums(glob)
    std = 0.5 * 1.3  # C z
    noisy = privatize(zero, counts, std, torch.Generator().manual_seed(0))
    new = apply_sums(glob, noisy, delta=True, denominator=counts)["m"]
    for lo, hi, c in ((0, 2, 4), (2, 4, 3), (4, 8, 2)):
        # the sum carries N(0, (zC)^2) per coordinate; the segment's average (zC / c_j)^2
        sum_noise = torch.cat(
            [noisy.factors["m"].A[lo:hi].flatten(), noisy.factors["m"].B[:, lo:hi].flatten()]
        )
        avg_noise = torch.cat([new.A[lo:hi].flatten(), new.B[:, lo:hi].flatten()]).double()
        n = sum_noise.numel()
        tol = 4 / (2 * n) ** 0.5  # 4 standard errors of a sample std
        assert abs(sum_noise.std().item() / std - 1) < tol, (lo, hi)
        assert abs(avg_noise.std().item() / (std / c) - 1) < tol, (lo, hi)
        assert abs(sum_noise.mean().item()) < 4 * std / n**0.5
    assert not new.A[8:].any() and not new.B[:, 8:].any()  # unowned rows: kept, no noise


def _delta_by_hand(eps: float, s: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity 1 and std s (Balle and Wang 2018)."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(1 / (2 * s) - eps * s) - math.exp(eps) * phi(-1 / (2 * s) - eps * s)


def _eps_by_hand(z: float, rounds: int, delta: float) -> float:
    s = z / math.sqrt(rounds)  # T Gaussian mechanisms = one of std z / sqrt(T)
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _delta_by_hand(mid, s) > delta else (lo, mid)
    return hi


def test_accountant_matches_the_library_and_a_hand_computation() -> None:
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import PLDAccountant

    eps = [epsilon(1.2, t, 1e-5) for t in range(1, 41)]
    assert all(b > a for a, b in itertools.pairwise(eps))  # monotone in rounds
    for t in (1, 5, 40):
        assert epsilon(1.2, t, 1e-5) == pytest.approx(_eps_by_hand(1.2, t, 1e-5), rel=1e-6)
    # the library's PLD accountant, composing the rounds itself
    acc = PLDAccountant()
    acc.compose(GaussianDpEvent(1.2), 3)
    assert epsilon(1.2, 3, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)
    # a simple configuration: C = 0.5, target epsilon 2 at delta 1e-5 over 4 rounds
    plan = build_plan(
        _cfg(["run.rounds=4", "privacy.clip=0.5", "privacy.target_epsilon=2.0", "privacy.delta=1e-5"])
    )
    assert plan.privacy is not None and plan.privacy.noise_multiplier is not None
    z = plan.privacy.noise_multiplier
    lo, hi = 0.1, 100.0  # by hand: the z whose 4-round epsilon is 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _eps_by_hand(mid, 4, 1e-5) < 2.0 else (mid, hi)
    assert z == pytest.approx(hi, rel=1e-5)
    assert plan.privacy.noise_std == pytest.approx(0.5 * hi, rel=1e-5)
    assert epsilon(z, 4, 1e-5) <= 2.0


def test_sent_rows_keep_segments_with_enough_owners() -> None:
    assert sent_rows([2, 4, 8], [2, 4, 8], 1) == 8
    assert sent_rows([2, 4, 8], [2, 4, 8], 2) == 4  # the rank-8 client alone owns [4, 8)
    assert sent_rows([2, 4, 8, 8], [2, 4, 8], 2) == 8
    assert sent_rows([2, 2], [2, 4, 8], 3) == 0


def test_a_privacy_run_writes_the_privacy_block(tmp_path: Path) -> None:
    from prelort.cli import main

    args = ["run", "--config", str(SYNTHETIC), "--out", str(tmp_path / "dp")]
    for s in [*SMALL, *DP]:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((tmp_path / "dp" / "results.json").read_text())
    p = res["privacy"]
    assert (p["delta"], p["noise_multiplier"], p["clip"], p["rounds"]) == (1e-5, 1.0, 0.5, 2)
    assert p["epsilon"] == pytest.approx(epsilon(1.0, 2, 1e-5)) and p["epsilon"] > 0
    assert res["config"]["privacy"]["clip"] == 0.5
    assert all(r["rows"] == 8 and math.isnan(r["train_loss"]) for r in res["rounds"][1:])
    # the saved config.toml reads back to the same config (resume, compare)
    again = load_config(str(tmp_path / "dp" / "config.toml"))
    assert again.privacy == _cfg(DP).privacy
    # configs without [privacy] serialize exactly as before: no privacy key at all
    assert "privacy" not in config_to_dict(_cfg([]))


def test_noise_is_reproducible_with_a_noise_seed_only() -> None:
    from prelort.federation.privacy import noise_generator

    plan = build_plan(_cfg(DP)).privacy
    assert plan is not None
    a = torch.randn(5, generator=noise_generator(plan, 0, 1))
    assert torch.equal(a, torch.randn(5, generator=noise_generator(plan, 0, 1)))
    secret = replace(plan, noise_seed=None)
    assert not torch.equal(
        torch.randn(5, generator=noise_generator(secret, 0, 1)),
        torch.randn(5, generator=noise_generator(secret, 0, 1)),
    )


def test_in_process_sum_rounds_equal_the_plain_rule() -> None:
    """Secure-aggregation rounds without DP (sums of delta messages, every segment aggregated)
    end with the plain segment rule's adapter; DP rounds differ by the noise only."""
    from prelort.federation.core import ServerState

    def final(extra: list[str]) -> tuple[ServerState, dict[str, object]]:
        cfg = _cfg(["run.method='segment'", *extra])
        states: list[ServerState] = []
        res = run_simulation(cfg, build_workload(cfg), on_state=lambda s, _r: states.append(s))
        return states[-1], res

    plain, _ = final([])
    summed, res = final(["privacy.secure_aggregation=true", "privacy.min_segment_owners=1"])
    _close(summed.adapter, plain.adapter, atol=1e-5)
    assert res["privacy"] == {"secure_aggregation": True, "min_segment_owners": 1, "rounds": 2}
    # with two owners needed, the rank-8 client's segment [4, 8) is never aggregated
    two, res2 = final(["privacy.secure_aggregation=true"])
    assert [r["rows"] for r in res2["rounds"][1:]] == [4, 4]
    for name, pair in two.adapter.items():
        assert not pair.B[:, 4:].any(), name  # B starts at 0 and was never updated there


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["privacy.clip=0", "privacy.noise_multiplier=1", "privacy.delta=1e-5"], "privacy.clip = 0"),
        (["privacy.clip=1", "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta = 1"),
        (
            [
                "privacy.clip=1",
                "privacy.noise_multiplier=1",
                "privacy.target_epsilon=2",
                "privacy.delta=1e-5",
            ],
            "got both",
        ),
        (["privacy.clip=1", "privacy.delta=1e-5"], "got neither"),
        (["privacy.secure_aggregation=false"], "enables nothing"),
        (
            ["privacy.clip=1", "privacy.noise_multiplier=1", "privacy.delta=1e-5", "run.method='flexlora'"],
            "ratio of sums",
        ),
    ],
)
def test_inconsistent_privacy_config_exits_2_with_one_line(
    extra: list[str], message: str, tmp_path: Path
) -> None:
    args = ["run", "--config", str(SYNTHETIC), "--out", str(tmp_path / "out")]
    for s in extra:
        args += ["--set", s]
    proc = subprocess.run(
        [sys.executable, "-m", "prelort.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prelort: error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
