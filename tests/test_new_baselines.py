"""Fed-PLoRA, FLoRIST and RB-LoRA (issue #13) on hand-made tensors, with expectations computed
independently of the rules (explicit loops, dense products, torch's own SVD)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prelort.adapters import LoRAPair, Scaling
from prelort.adapters.nested import NestedLoRA
from prelort.adapters.state import adapter_num_bytes
from prelort.aggregation import ClientUpdate, aggregate, get_rule
from prelort.aggregation.base import RuleOptions
from prelort.aggregation.fed_plora import select_modules
from prelort.aggregation.florist import energy_rank, stacked_svd
from prelort.federation.methods import get_method

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _global(R: int, n_in: int, n_out: int, seed: int = 0) -> dict[str, LoRAPair]:
    return {"m": LoRAPair(_rand(R, n_in, seed=seed), _rand(n_out, R, seed=seed + 1))}


# -- Fed-PLoRA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
def test_fed_plora_fold_plus_selected_modules_is_the_global_model(kind: str) -> None:
    R, n_in, n_out = 6, 5, 4
    scaling = Scaling(kind, alpha=12.0, max_rank=R)  # type: ignore[arg-type]
    g = _global(R, n_in, n_out)
    rule = get_rule("fed-plora", RuleOptions(scaling=scaling, seed=11))
    full = scaling(R) * (g["m"].B.double() @ g["m"].A.double())  # W - W0 of the global model
    for k, r in [(0, 1), (3, 2), (5, 4)]:
        down = rule.downlink(g, r, client_id=k, round_=7)["m"]
        fold = rule.fold(g, r, client_id=k, round_=7)
        assert fold is not None
        chosen = select_modules(11, 7, k, r, R)
        assert len(set(chosen)) == r and chosen == select_modules(11, 7, k, R, R)[:r]  # nested choice
        # the downlink holds exactly the selected modules, in selection order (B rescaled to s(r))
        for pos, j in enumerate(chosen):
            torch.testing.assert_close(down.A[pos], g["m"].A[j])
            torch.testing.assert_close(down.B[:, pos] * scaling(r), g["m"].B[:, j] * scaling(R))
        # the fold is the other modules' sum, computed here module by module
        rest = sum(
            scaling(R) * torch.outer(g["m"].B[:, j].double(), g["m"].A[j].double())
            for j in range(R)
            if j not in chosen
        )
        torch.testing.assert_close(fold.delta["m"].double(), rest, rtol=1e-5, atol=1e-6)
        # W0 + fold + trained-part == W0 + all modules before training: zero initialisation noise
        mine = fold.delta["m"].double() + scaling(r) * (down.B.double() @ down.A.double())
        torch.testing.assert_close(mine, full, rtol=1e-5, atol=1e-6)
        # what the fold costs: the unselected factors (the client folds them itself)
        assert fold.num_bytes == 4 * (R - r) * (n_in + n_out)
    assert rule.fold(g, R, client_id=1, round_=7) is None  # a rank-R client folds nothing
    # without a client (evaluation): modules 0..r-1 plus the fold of the rest = the whole model
    down, fold = rule.downlink(g, 2)["m"], rule.fold(g, 2)
    assert fold is not None
    torch.testing.assert_close(down.A, g["m"].A[:2])
    torch.testing.assert_close(
        fold.delta["m"].double() + scaling(2) * (down.B.double() @ down.A.double()),
        full,
        rtol=1e-5,
        atol=1e-6,
    )


def test_fed_plora_folding_then_unfolding_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    R = 4
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    nested = NestedLoRA(model, ["0"], Scaling("per_rank", alpha=8.0, max_rank=R))
    g = {name: LoRAPair(_rand(R, 5, seed=3), _rand(3, R, seed=4)) for name in nested.layers}
    x = _rand(7, 5, seed=5)
    w0 = nested.layers["0"].get_base_layer().weight.detach().clone()
    nested.set_adapter(g)
    nested.set_rank(R)
    with torch.no_grad():
        before = model(x)
    rule = get_rule("fed-plora", RuleOptions(scaling=nested.scaling, seed=2))
    down = rule.downlink(g, 2, client_id=1, round_=3)
    fold = rule.fold(g, 2, client_id=1, round_=3)
    assert fold is not None
    msg = rule.message(g, {}, 2, client_id=1, round_=3)
    assert msg.base is not None and torch.equal(msg.base["0"], fold.delta["0"])
    assert msg.num_bytes == adapter_num_bytes(down) + fold.num_bytes
    nested.set_base(msg.base)  # what the client trains on: W0 + fold, rank-2 modules
    nested.set_adapter(msg.adapter)
    nested.set_rank(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    nested.set_base(None)
    # un-folded: the base weights are W0 again, bit for bit, and the global model unchanged
    assert torch.equal(nested.layers["0"].get_base_layer().weight, w0)
    nested.set_adapter(g)
    nested.set_rank(R)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("kind", ["fixed", "per_rank"])
def test_fed_plora_each_module_is_averaged_over_its_trainers_only(kind: str) -> None:
    R, n_in, n_out, seed, t = 8, 3, 2, 5, 4
    scaling = Scaling(kind, alpha=8.0, max_rank=R)  # type: ignore[arg-type]
    old = LoRAPair(torch.full((R, n_in), 7.0), torch.full((n_out, R), -7.0))
    clients = [(0, 1, 1.0), (1, 2, 2.0), (2, 2, 3.0)]  # (id, rank, n_k): at most 5 of 8 modules trained
    updates = []
    for k, r, n in clients:  # client k sends a_j = k + 1 and B columns 10 (k + 1) for its modules
        pair = LoRAPair(torch.full((r, n_in), k + 1.0), torch.full((n_out, r), 10.0 * (k + 1)))
        updates.append(ClientUpdate({"m": pair}, r, int(n), k))
    rule = get_rule("fed-plora", RuleOptions(scaling=scaling, seed=seed, round=t))
    new = rule.aggregate({"m": old}, updates).adapter["m"]
    untrained = 0
    for j in range(R):
        trainers = [(k, r, n) for k, r, n in clients if j in select_modules(seed, t, k, r, R)]
        if not trainers:  # nobody trained module j this round: it keeps its value
            untrained += 1
            assert torch.equal(new.A[j], old.A[j]) and torch.equal(new.B[:, j], old.B[:, j])
            continue
        total = sum(n for _, _, n in trainers)
        a = sum(n * (k + 1.0) for k, _, n in trainers) / total
        # a client trained at scale s(r_k); the global module is applied at s(R)
        b = sum(n * 10.0 * (k + 1) * scaling(r) / scaling(R) for k, r, n in trainers) / total
        torch.testing.assert_close(new.A[j], torch.full((n_in,), a))
        torch.testing.assert_close(new.B[:, j], torch.full((n_out,), b))
    assert untrained >= R - 5


def test_fed_plora_downlink_and_aggregate_agree_on_the_modules() -> None:
    # a client that returns its downlink unchanged leaves the global adapter unchanged
    R = 8
    g = _global(R, 4, 3)
    rule = get_rule("fed-plora", RuleOptions(scaling=Scaling("rslora", 4.0, R), seed=9, round=2))
    ups = [
        ClientUpdate(rule.downlink(g, r, client_id=k, round_=2), r, 10 + k, k)
        for k, r in [(0, 2), (1, 4), (2, 8)]
    ]
    new = rule.aggregate(g, ups).adapter["m"]
    torch.testing.assert_close(new.A, g["m"].A)
    torch.testing.assert_close(new.B, g["m"].B)


# -- FLoRIST -------------------------------------------------------------------------------------
def test_florist_stacked_svd_is_the_svd_of_the_product() -> None:
    B, A = _rand(6, 5, seed=1).double(), _rand(5, 9, seed=2).double()
    U, S, Vh = stacked_svd(B, A)
    dense = torch.linalg.svdvals(B @ A)  # 6 values, the last 0: B @ A has rank 5
    torch.testing.assert_close(S, dense[:5])
    assert float(dense[5]) < 1e-10
    torch.testing.assert_close((U * S) @ Vh, B @ A)
    torch.testing.assert_close(U.T @ U, torch.eye(S.numel(), dtype=torch.float64))


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


@pytest.mark.parametrize(("tau", "p"), [(0.5, 1), (0.6, 1), (0.7, 2), (0.9, 2), (0.95, 3), (1.0, 3)])
def test_florist_threshold_keeps_the_energy_share_with_the_smallest_rank(tau: float, p: int) -> None:
    # one client whose update has singular values 3, 2, 1: energies 9, 4, 1 of 14
    U, V = _orthonormal(5, 3, 0), _orthonormal(6, 3, 1)
    sig = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    up = ClientUpdate({"m": LoRAPair((V * 1.0).T.float(), (U * sig).float())}, 3, 4, 0)
    g = {"m": LoRAPair(torch.zeros(4, 6), torch.zeros(5, 4))}
    rule = get_rule("florist", RuleOptions(energy_threshold=tau, generator=torch.Generator().manual_seed(0)))
    res = rule.aggregate(g, [up])
    energies = [9.0, 4.0, 1.0]
    assert res.info["m"][0] == p
    assert sum(energies[:p]) / 14 >= tau > sum(energies[: p - 1]) / 14  # kept share, minimal p
    assert res.info["m"][1] == pytest.approx(sum(energies[:p]) / 14)
    best = (U[:, :p] * sig[:p]) @ V[:, :p].T  # the best rank-p approximation, built by hand
    assert res.base_delta is not None
    torch.testing.assert_close(res.base_delta["m"].double(), best, rtol=1e-5, atol=1e-6)
    assert res.broadcast_bytes == 4 * p * (5 + 6)  # the shared pair B_g (5 x p), A_g (p x 6)
    assert torch.count_nonzero(res.adapter["m"].B) == 0  # clients restart from a fresh adapter


def test_florist_threshold_on_random_updates_against_svdvals() -> None:
    ups = [
        ClientUpdate({"m": LoRAPair(_rand(r, 9, seed=2 * r), _rand(7, r, seed=2 * r + 1))}, r, n, k)
        for k, (r, n) in enumerate([(2, 5), (4, 1), (8, 3)])
    ]
    scaling = Scaling("per_rank", alpha=16.0, max_rank=8)
    dense = sum(
        u.num_examples / 9 * scaling(u.rank) * (u.adapter["m"].B.double() @ u.adapter["m"].A.double())
        for u in ups
    )
    energies = torch.linalg.svdvals(dense) ** 2
    for tau in (0.5, 0.8, 0.95, 0.999):
        rule = get_rule("florist", RuleOptions(scaling=scaling, energy_threshold=tau))
        res = rule.aggregate({"m": LoRAPair(torch.zeros(8, 9), torch.zeros(7, 8))}, ups)
        p = int(res.info["m"][0])
        share = energies.cumsum(0) / energies.sum()
        assert share[p - 1] >= tau and (p == 1 or share[p - 2] < tau)
        assert energy_rank(torch.linalg.svdvals(dense), tau) == p


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
def test_florist_full_threshold_reconstructs_the_exact_weighted_sum(kind: str) -> None:
    scaling = Scaling(kind, alpha=16.0, max_rank=8)  # type: ignore[arg-type]
    sizes = [3, 10, 7]
    ups = [
        ClientUpdate({"m": LoRAPair(_rand(r, 5, seed=r), _rand(4, r, seed=r + 50))}, r, n, k)
        for k, (r, n) in enumerate(zip([2, 4, 8], sizes, strict=True))
    ]
    rule = get_rule("florist", RuleOptions(scaling=scaling, energy_threshold=1.0))
    res = rule.aggregate({"m": LoRAPair(_rand(8, 5, seed=0), torch.zeros(4, 8))}, ups)
    expect = sum(
        n / 20 * scaling(u.rank) * (u.adapter["m"].B.double() @ u.adapter["m"].A.double())
        for n, u in zip(sizes, ups, strict=True)
    )
    assert res.base_delta is not None
    torch.testing.assert_close(res.base_delta["m"].double(), expect, rtol=1e-5, atol=1e-6)
    assert res.info["m"][0] == 4  # rank of a 4 x 5 update: every direction kept


# -- RB-LoRA -------------------------------------------------------------------------------------
def test_rb_lora_weights_by_hand() -> None:
    # R = 2; client 0 of rank 1 with n = 1, client 1 of rank 2 with n = 3 (s = 1)
    # (out = 2, so the aggregate has rank <= 2 = R and the rank-R global adapter holds it exactly)
    a00, b00 = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0], [1.0]])
    A1 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    B1 = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    ups = [ClientUpdate({"m": LoRAPair(a00, b00)}, 1, 1, 0), ClientUpdate({"m": LoRAPair(A1, B1)}, 2, 3, 1)]
    g = {"m": LoRAPair(torch.zeros(2, 3), torch.zeros(2, 2))}
    res = aggregate("rb-lora", g, ups)
    # alpha = n_k / N = (1/4, 3/4); beta_i = N / D_i with D_0 = 1 + 3, D_1 = 3: (1, 4/3)
    assert res.info["alpha"] == pytest.approx([0.25, 0.75])
    assert res.info["beta"] == pytest.approx([1.0, 4 / 3])
    # gamma_0(0) = 1/4, gamma_0(1) = 3/4, gamma_1(1) = 3/4 * 4/3 = 1 (only client 1 holds column 1)
    expect = (
        0.25 * torch.outer(b00[:, 0], a00[0])
        + 0.75 * torch.outer(B1[:, 0], A1[0])
        + 1.0 * torch.outer(B1[:, 1], A1[1])
    )
    got = res.adapter["m"]
    torch.testing.assert_close(got.B @ got.A, expect, rtol=1e-5, atol=1e-6)
    # a rank-1 client receives the best rank-1 approximation of that update
    down = get_rule("rb-lora").downlink(res.adapter, 1)["m"]
    U, S, Vh = torch.linalg.svd(expect.double())
    torch.testing.assert_close(
        (down.B @ down.A).double(), S[0] * torch.outer(U[:, 0], Vh[0]), rtol=1e-4, atol=1e-5
    )


def test_rb_lora_with_equal_ranks_is_flexlora() -> None:
    # every client holds every column: beta = 1, gamma = n_k / N, i.e. FlexLoRA's weighted sum
    ups = [
        ClientUpdate({"m": LoRAPair(_rand(4, 5, seed=k), _rand(3, 4, seed=k + 9))}, 4, n, k)
        for k, n in enumerate([2, 5, 1])
    ]
    g = {"m": LoRAPair(torch.zeros(4, 5), torch.zeros(3, 4))}
    scaling = Scaling("fixed", 8.0, 4)
    a, b = aggregate("rb-lora", g, ups, scaling=scaling), aggregate("flexlora", g, ups, scaling=scaling)
    assert a.info["beta"] == pytest.approx([1.0] * 4)
    torch.testing.assert_close(a.adapter["m"].B @ a.adapter["m"].A, b.adapter["m"].B @ b.adapter["m"].A)


# -- methods, driver and the command line ----------------------------------------------------------
def test_families_of_the_new_methods() -> None:
    assert get_method("fed-plora").family == "merged"
    assert get_method("florist").family == "merged"
    assert get_method("rb-lora").family == "rank-limited"


SMALL = [
    "run.rounds=3",
    "run.eval_every=3",
    "train.steps=3",
    "train.batch_size=8",
    "synthetic.hidden=12",
    "synthetic.min_examples=16",
    "synthetic.max_examples=32",
    "synthetic.test_examples=40",
]


def test_fed_plora_jobs_carry_folds_the_bytes_count_all_modules_and_w0_is_restored() -> None:
    from prelort.config import load_config
    from prelort.federation.simulator import make_driver
    from prelort.workloads import build_workload

    cfg = load_config(ROOT / "configs" / "synthetic.toml", [*SMALL, 'run.method="fed-plora"'])
    driver = make_driver(cfg, build_workload(cfg))
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in driver.nested.layers.items()}
    state, _ = driver.start()
    state, record = driver.run_round(1, state)
    R = cfg.max_rank
    full = sum(4 * R * (b + a) for b, a in driver.nested.shapes().values())  # all R modules
    assert record["bytes_down"] == full * len(record["clients"])
    for k in range(cfg.clients.num_clients):
        job = driver.job(state, k, 2)
        r = state.client_ranks[k]
        assert (job.base is None) == (r == R)  # the fold is the job's base delta
        assert job.num_bytes == full * r // R + full * (R - r) // R  # its modules + the fold's
    driver.nested.set_base(None)  # whatever base the last client or level had: back to W0 exactly
    for n, layer in driver.nested.layers.items():
        assert torch.equal(layer.get_base_layer().weight, w0[n])


@pytest.mark.parametrize("method", ["fed-plora", "florist", "rb-lora"])
def test_prelort_run_reports_every_rank_level(method: str, tmp_path: Path) -> None:
    from prelort.cli import main

    out = tmp_path / method
    args = ["run", "--config", str(ROOT / "configs" / "synthetic.toml"), "--out", str(out), "--quiet"]
    for s in [f'run.method="{method}"', *SMALL]:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["family"] == get_method(method).family
    levels = {"2", "4", "8", "16"}
    assert set(res["final"]["per_rank"]) == levels and set(res["rounds"][0]["per_rank"]) == levels
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in res["final"]["per_rank"].values())
    if res["family"] == "merged":  # one full model, the same at every level (up to rounding)
        losses = [m["loss"] for m in res["final"]["per_rank"].values()]
        assert max(losses) == pytest.approx(min(losses), rel=1e-5)
    if method == "fed-plora":  # a rank-2 client's model cannot be a rank-2 adapter; rank R can
        assert main(["export", "--run", str(out), "--rank", "2", "--out", str(tmp_path / "a2")]) == 2
        assert main(["export", "--run", str(out), "--rank", "16", "--out", str(tmp_path / "a16")]) == 0
    assert main(["eval", "--run", str(out), "--ranks", "2,16", "--out", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    for lv in ("2", "16"):
        assert evaluated[lv]["loss"] == pytest.approx(res["final"]["per_rank"][lv]["loss"], rel=1e-5)
