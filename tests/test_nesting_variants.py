"""Nested training that does not cost the top rank: sandwich, self-distillation, MatryoshkaLoRA's
one-pass weighting and the own-weight schedule (docs/design.md §2).

Every expected value is computed here independently: the adapted network is re-implemented
functionally (W x + b + s * B diag(w) A x per target layer) and differentiated with autograd.
Models are built from local generators; torch's global generator is never reseeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from prelort.adapters import LoRAPair, NestedLoRA, Scaling
from prelort.config import config_from_dict
from prelort.errors import ConfigError
from prelort.federation.plan import build_plan
from prelort.training.lm_loss import answer_kl
from prelort.training.local import (
    LocalTrainConfig,
    level_distribution,
    lower_level_distribution,
    matryoshka_weights,
    train_local,
)
from prelort.workloads.llm import LLMWorkload
from prelort.workloads.synthetic import SyntheticWorkload

R = 8
ALPHA = 16.0
D_IN, HIDDEN, D_OUT = 5, 7, 3
TARGETS = ("fc1", "fc2")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.utils.skip_init(nn.Linear, D_IN, HIDDEN)  # no global-RNG init
        self.fc2 = nn.utils.skip_init(nn.Linear, HIDDEN, HIDDEN)
        self.head = nn.utils.skip_init(nn.Linear, HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return out


def _setup(seed: int = 0, scaling: str = "fixed") -> tuple[NestedLoRA, dict[str, torch.Tensor]]:
    """A NestedLoRA of rank R on a random Net, non-zero A and B, and a copy of the base weights."""
    g = torch.Generator().manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    nested = NestedLoRA(net, list(TARGETS), Scaling(scaling, ALPHA, R))  # type: ignore[arg-type]
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(R, s[1], generator=g) * 0.4, torch.randn(s[0], R, generator=g) * 0.4)
            for n, s in nested.shapes().items()
        }
    )
    return nested, base


def _factors(nested: NestedLoRA) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Leaf copies of the live (A, B) of every target, requiring grad."""
    out = {}
    for n in TARGETS:
        A, B = nested.factor(n)
        out[n] = (A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True))
    return out


def _weights(r: int, w: list[float] | None = None) -> torch.Tensor:
    """The per-dimension weight vector: w (padded) or the hard mask 1[i < r]."""
    v = torch.zeros(R)
    v[:r] = 1.0 if w is None else torch.tensor(w[:r])
    return v


def _forward(
    base: dict[str, torch.Tensor],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    r: int,
    s: float,
    w: list[float] | None = None,
) -> torch.Tensor:
    """head(tanh(L2(tanh(L1 x)))) with L(x) = W x + b + s * B diag(w) A x."""

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        W, b = base[f"{name}.weight"], base[f"{name}.bias"]
        out = h @ W.T + b
        if name in factors:
            A, B = factors[name]
            out = out + s * ((h @ A.T) * _weights(r, w)) @ B.T
        return out

    return lin("head", torch.tanh(lin("fc2", torch.tanh(lin("fc1", x)))))


def _batches(seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(12, D_IN, generator=g)
        yield x, torch.sin(2 * x[:, :D_OUT])


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum() / a.numel()


def _grads(loss: torch.Tensor, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    leaves = [t for n in TARGETS for t in factors[n]]
    return list(torch.autograd.grad(loss, leaves, retain_graph=True))


class _Capture:
    """on_step callback: after each optimiser step, the gradients it used."""

    def __init__(self, nested: NestedLoRA) -> None:
        self.nested = nested
        self.grads: list[list[torch.Tensor]] = []

    def __call__(self) -> None:
        self.grads.append([t.grad.detach().clone() for n in TARGETS for t in self.nested.factor(n)])


class _Logged:
    """A loss function that records the truncation of every pass."""

    def __init__(self, nested: NestedLoRA) -> None:
        self.nested = nested
        self.ranks: list[int] = []

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.ranks.append(self.nested.rank)
        x, y = batch
        return torch.mean((model(x) - y) ** 2)


def _synthetic_distiller() -> SyntheticWorkload:
    """The synthetic workload's outputs / output_loss / distill_loss (its data is unused)."""
    from prelort.config import SyntheticSection

    cfg = SyntheticSection(
        d_in=D_IN, hidden=HIDDEN, d_out=D_OUT, teacher_rank=2, min_examples=8, max_examples=8,
        test_examples=8, data_seed=3,
    )  # fmt: skip
    return SyntheticWorkload(cfg, num_clients=1, batch_size=4)


# -- sandwich ------------------------------------------------------------------------------------
def test_lower_level_distribution_is_c_restricted_below_the_own_rank() -> None:
    dist = level_distribution(8, [2, 4, 8], "geometric")  # c = 1/7, 2/7, 4/7
    assert lower_level_distribution(dist, 8) == pytest.approx({2: 1 / 3, 4: 2 / 3})
    assert lower_level_distribution(level_distribution(8, [2, 4, 8], 0.7), 8) == pytest.approx(
        {2: 0.5, 4: 0.5}
    )
    assert lower_level_distribution({2: 1.0}, 2) == {}


def test_sandwich_makes_two_passes_per_step_and_trains_the_own_rank_every_step() -> None:
    nested, _ = _setup()
    loss = _Logged(nested)
    cfg = LocalTrainConfig(steps=6, lr=0.01, mode="sandwich", own_weight=0.7)
    stats = train_local(nested, R, [2, 4, 8], _batches(), loss, cfg, torch.Generator().manual_seed(0))
    assert stats.passes == 12 and stats.steps == 6 and stats.examples == 6 * 12
    pairs = [loss.ranks[i : i + 2] for i in range(0, 12, 2)]
    assert all(p[0] == R and p[1] in (2, 4) for p in pairs)
    assert {p[1] for p in pairs} == {2, 4}  # both lower levels drawn in 6 steps with this seed
    assert set(stats.loss_per_level) == {2, 4, 8}


def test_sandwich_with_one_level_trains_plain() -> None:
    a, _ = _setup()
    b, _ = _setup()
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    loss_a, loss_b = _Logged(a), _Logged(b)
    sa = train_local(a, 2, [2, 4, 8], _batches(), loss_a, LocalTrainConfig(steps=3, mode="sandwich"), gen_a)
    sb = train_local(b, 2, [2, 4, 8], _batches(), loss_b, LocalTrainConfig(steps=3, mode="plain"), gen_b)
    assert sa.passes == sb.passes == 3 and loss_a.ranks == [2, 2, 2]
    for n in TARGETS:
        assert torch.equal(a.factor(n)[0], b.factor(n)[0]) and torch.equal(a.factor(n)[1], b.factor(n)[1])


def test_sandwich_step_is_one_adamw_step_on_the_documented_combined_loss() -> None:
    # combined loss: c_{r_k} loss(r_k) + (1 - c_{r_k}) loss(l), c_{r_k} = own_weight = 0.7
    nested, base = _setup(seed=1)
    batch = next(_batches(2))
    x, y = batch
    factors = _factors(nested)
    before = [t.detach().clone() for n in TARGETS for t in factors[n]]
    loss = _Logged(nested)
    capture = _Capture(nested)
    lr, eps = 1e-3, 1e-8
    cfg = LocalTrainConfig(steps=1, lr=lr, eps=eps, mode="sandwich", own_weight=0.7)
    train_local(nested, R, [2, 4, 8], itertools.repeat(batch), loss, cfg, torch.Generator(), on_step=capture)
    assert loss.ranks[0] == R
    low = loss.ranks[1]
    s = ALPHA / R
    own_loss = _mse(_forward(base, factors, x, R, s), y)
    low_loss = _mse(_forward(base, factors, x, low, s), y)
    combined = 0.7 * own_loss + 0.3 * low_loss
    expected = _grads(combined, factors)
    for got, exp in zip(capture.grads[0], expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
    # a first (bias-corrected) Adam step: p - lr * g / (|g| + eps)
    after = [t.detach() for n in TARGETS for t in nested.factor(n)]
    for p0, p1, g in zip(before, after, expected, strict=True):
        torch.testing.assert_close(p1, p0 - lr * g / (g.abs() + eps), rtol=1e-5, atol=1e-7)


def test_local_steps_halve_for_sandwich_under_the_passes_budget() -> None:
    def plan(steps: int, mode: str, budget: str = "passes"):  # type: ignore[no-untyped-def]
        return build_plan(
            config_from_dict({"train": {"steps": steps, "nested_mode": mode, "budget": budget}})
        )

    p = plan(10, "sandwich")  # levels 2, 4, 8, 16
    assert [p.local_steps(r) for r in (2, 4, 8, 16)] == [10, 5, 5, 5]
    assert plan(7, "sandwich").local_steps(8) == 4  # round(3.5)
    assert plan(1, "sandwich").local_steps(8) == 1
    assert plan(10, "sandwich", "steps").local_steps(8) == 10
    assert plan(10, "matryoshka").local_steps(16) == 10  # one pass per step
    cfg = p.local_config(8, 1)
    assert cfg.mode == "sandwich" and cfg.steps == 5
    nested, _ = _setup()
    stats = train_local(nested, R, [2, 4, 8], _batches(), _Logged(nested), cfg, torch.Generator())
    assert stats.passes == 10  # 5 steps x 2 passes: the budget of a one-pass client


# -- self-distillation ---------------------------------------------------------------------------
def test_synthetic_distill_loss_and_output_loss_on_a_hand_made_example() -> None:
    wl = _synthetic_distiller()
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [1.0, 5.0]], requires_grad=True)
    kd = wl.distill_loss(student, teacher, (None, None))
    assert float(kd.detach()) == pytest.approx((1 + 0 + 4 + 1) / 4)
    kd.backward()  # type: ignore[no-untyped-call]
    assert teacher.grad is None  # the teacher is detached
    torch.testing.assert_close(student.grad, torch.tensor([[0.5, 0.0], [1.0, -0.5]]))
    y = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert float(wl.output_loss(student, (None, y)).detach()) == pytest.approx((0 + 1 + 4 + 9) / 4)


def test_llm_kl_on_a_tiny_logits_tensor_with_a_mask() -> None:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=g) * 2
    # labels[:, 1:] = [[-100, 7, 3, -100], [-100, 2, -100, 4]]: kept positions 1, 2, 3
    labels = torch.tensor([[-100, -100, 7, 3, -100], [-100, -100, 2, -100, 4]])
    target = torch.tensor([[7, 3, -100], [2, -100, 4]])

    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        m = z.max(dim=-1, keepdim=True).values
        return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))

    lt, ls = log_softmax(teacher), log_softmax(student.detach())
    kl = (torch.exp(lt) * (lt - ls)).sum(-1)  # (2, 3)
    expected = (kl[0, 0] + kl[0, 1] + kl[1, 0] + kl[1, 2]) / 4
    assert float(answer_kl(student, teacher, target).detach()) == pytest.approx(float(expected), rel=1e-6)
    # the workload's distill loss finds the same positions from the batch's labels
    got = LLMWorkload.distill_loss(None, student, teacher, {"labels": labels})  # type: ignore[arg-type]
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-6)
    got.backward()  # type: ignore[no-untyped-call]
    assert student.grad is not None and torch.count_nonzero(student.grad[0, 2]) == 0  # masked token
    nothing = torch.full((2, 3), -100)
    assert float(answer_kl(student, teacher, nothing).detach()) == 0.0


def test_llm_outputs_and_output_loss_give_the_training_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prelort.training.lm_loss import answer_loss

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        )
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(2, 16, (2, 7), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = LLMWorkload.outputs(None, model, batch)  # type: ignore[arg-type]
    assert out.shape == (2, 3, 16)  # positions 3, 4, 5 predict a labelled token of some row
    loss = LLMWorkload.output_loss(None, out, batch)  # type: ignore[arg-type]
    torch.testing.assert_close(loss, answer_loss(model, batch))
    assert float(LLMWorkload.distill_loss(None, out, out, batch).detach()) == pytest.approx(0.0, abs=1e-7)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["sandwich", "all"])
def test_distillation_with_lambda_zero_equals_no_distillation(mode: str) -> None:
    a, _ = _setup(seed=2)
    b, _ = _setup(seed=2)
    wl = _synthetic_distiller()
    base_cfg = LocalTrainConfig(steps=4, lr=0.01, mode=mode)  # type: ignore[arg-type]
    zero_cfg = LocalTrainConfig(steps=4, lr=0.01, mode=mode, distill=0.0)  # type: ignore[arg-type]
    sa = train_local(a, R, [2, 4, 8], _batches(), wl.loss, base_cfg, torch.Generator().manual_seed(1))
    sb = train_local(
        b, R, [2, 4, 8], _batches(), wl.loss, zero_cfg, torch.Generator().manual_seed(1), distiller=wl
    )
    assert sa == sb
    for n in TARGETS:
        assert torch.equal(a.factor(n)[0], b.factor(n)[0]) and torch.equal(a.factor(n)[1], b.factor(n)[1])


def test_sandwich_distillation_lambda_one_trains_the_lower_level_on_mse_to_the_detached_teacher() -> None:
    nested, base = _setup(seed=3)
    wl = _synthetic_distiller()
    x, y = next(_batches(4))
    factors = _factors(nested)
    capture = _Capture(nested)
    levels_seen: list[int] = []

    class Spy:
        def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
            levels_seen.append(nested.rank)
            return wl.outputs(model, batch)

        def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
            return wl.output_loss(outputs, batch)

        def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
            return wl.distill_loss(student, teacher, batch)

    cfg = LocalTrainConfig(steps=1, lr=1e-3, mode="sandwich", own_weight=0.7, distill=1.0)
    stats = train_local(
        nested, R, [2, 4, 8], itertools.repeat((x, y)), wl.loss, cfg, torch.Generator(), on_step=capture,
        distiller=Spy(),
    )  # fmt: skip
    assert stats.passes == 2 and levels_seen[0] == R  # the teacher pass is the own-rank pass
    low = levels_seen[1]
    s = ALPHA / R
    teacher = _forward(base, factors, x, R, s)
    student = _forward(base, factors, x, low, s)
    g_own = _grads(_mse(teacher, y), factors)
    g_kd = _grads(_mse(student, teacher.detach()), factors)
    g_task = _grads(_mse(student, y), factors)
    for got, go, gk in zip(capture.grads[0], g_own, g_kd, strict=True):
        torch.testing.assert_close(got, 0.7 * go + 0.3 * gk, rtol=1e-5, atol=1e-7)
    assert not all(torch.allclose(a, b) for a, b in zip(g_kd, g_task, strict=True))  # not the task loss


def test_all_mode_distillation_mixes_task_and_distillation_loss_at_every_lower_level() -> None:
    nested, base = _setup(seed=5)
    wl = _synthetic_distiller()
    x, y = next(_batches(6))
    factors = _factors(nested)
    capture = _Capture(nested)
    lam = 0.4
    cfg = LocalTrainConfig(steps=1, lr=1e-3, mode="all", own_weight=0.6, distill=lam)
    stats = train_local(
        nested, R, [2, 4, 8], itertools.repeat((x, y)), wl.loss, cfg, torch.Generator(), on_step=capture,
        distiller=wl,
    )  # fmt: skip
    assert stats.passes == 3
    s = ALPHA / R
    teacher = _forward(base, factors, x, R, s)
    total = 0.6 * _mse(teacher, y)
    for low in (2, 4):
        student = _forward(base, factors, x, low, s)
        total = total + 0.2 * ((1 - lam) * _mse(student, y) + lam * _mse(student, teacher.detach()))
    for got, exp in zip(capture.grads[0], _grads(total, factors), strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)


# -- MatryoshkaLoRA ------------------------------------------------------------------------------
def test_matryoshka_weights_for_a_level_distribution() -> None:
    dist = level_distribution(8, [2, 4, 8], 0.7)  # c = 0.15, 0.15, 0.7
    # w_i = sum_{l > i} c_l: dims 0-1 in every level, 2-3 in levels 4 and 8, 4-7 in level 8
    assert matryoshka_weights(dist) == pytest.approx([1.0, 1.0, 0.85, 0.85, 0.7, 0.7, 0.7, 0.7])
    # per_rank scaling s(l) = alpha / l: w_i = sum_{l > i} c_l s(l) / s(8) = sum c_l 8 / l
    per_rank = Scaling("per_rank", ALPHA, 8)
    assert matryoshka_weights(dist, per_rank) == pytest.approx([1.6, 1.6, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7])
    assert matryoshka_weights({4: 1.0}) == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("r", [8, 5])
def test_dim_weights_forward_is_w_x_plus_s_b_diag_w_a_x(r: int) -> None:
    nested, base = _setup(seed=6)
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(9))
    layer = nested.layers["fc1"]
    nested.set_rank(r)
    plain = layer(x).detach().clone()
    w = [1.0, 1.0, 0.85, 0.85, 0.7, 0.7, 0.7, 0.7]
    nested.set_dim_weights(w)
    A, B = (t.detach() for t in nested.factor("fc1"))
    s = ALPHA / R
    manual = x @ base["fc1.weight"].T + base["fc1.bias"] + s * (B @ torch.diag(_weights(r, w)) @ A @ x.T).T
    torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-6)
    nested.set_dim_weights(None)
    assert torch.equal(layer(x), plain)  # off again: exactly the hard mask


def test_matryoshka_trains_all_truncations_in_one_pass_with_the_weighted_model() -> None:
    nested, base = _setup(seed=7)
    x, y = next(_batches(8))
    factors = _factors(nested)
    capture = _Capture(nested)
    loss = _Logged(nested)
    cfg = LocalTrainConfig(steps=1, lr=1e-3, mode="matryoshka", own_weight=0.7)
    stats = train_local(
        nested, R, [2, 4, 8], itertools.repeat((x, y)), loss, cfg, torch.Generator(), on_step=capture
    )
    assert stats.passes == 1 and loss.ranks == [R] and set(stats.loss_per_level) == {R}
    w = [1.0, 1.0, 0.85, 0.85, 0.7, 0.7, 0.7, 0.7]
    expected = _grads(_mse(_forward(base, factors, x, R, ALPHA / R, w), y), factors)
    for got, exp in zip(capture.grads[0], expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
    assert nested.dim_weights is None  # off after training


@pytest.mark.parametrize("mode", ["sandwich", "matryoshka"])
def test_new_modes_only_move_the_client_prefix(mode: str) -> None:
    nested, _ = _setup(seed=8)
    rank = 4
    nested.set_adapter(nested.get_adapter(rank))
    before = nested.get_adapter(R)
    cfg = LocalTrainConfig(steps=4, lr=0.05, mode=mode)  # type: ignore[arg-type]
    train_local(nested, rank, [2, 4, 8], _batches(), _Logged(nested), cfg, torch.Generator().manual_seed(0))
    after = nested.get_adapter(R)
    for n in after:
        assert torch.count_nonzero(after[n].A[rank:]) == 0 and torch.count_nonzero(after[n].B[:, rank:]) == 0
        assert not torch.equal(after[n].A[:rank], before[n].A[:rank])
    assert nested.rank == rank and not any(p.requires_grad for p in nested.model.parameters())


# -- own-weight schedule -------------------------------------------------------------------------
def test_own_weight_schedule_is_linear_over_the_rounds() -> None:
    cfg = config_from_dict(
        {
            "run": {"rounds": 5},
            "train": {"own_weight": 0.7, "own_weight_final": 0.3, "nested_mode": "sandwich"},
        }
    )
    plan = build_plan(cfg)
    got = [plan.local_config(8, t).own_weight for t in (1, 3, 5)]
    assert got == pytest.approx([0.7, 0.5, 0.3])
    assert plan.local_config(8, 2).own_weight == pytest.approx(0.6)
    const = build_plan(config_from_dict({"run": {"rounds": 5}, "train": {"own_weight": 0.7}}))
    assert {const.local_config(8, t).own_weight for t in (1, 3, 5)} == {0.7}
    one = build_plan(
        config_from_dict({"run": {"rounds": 1}, "train": {"own_weight": 0.7, "own_weight_final": 0.2}})
    )
    assert one.local_config(8, 1).own_weight == pytest.approx(0.7)


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"distill": 1.5, "nested_mode": "sandwich"}, "train.distill"),
        ({"distill": -0.1, "nested_mode": "sandwich"}, "train.distill"),
        ({"distill": float("nan"), "nested_mode": "all"}, "train.distill"),
        ({"distill": 0.5, "nested_mode": "sample"}, "train.distill"),
        ({"distill": 0.5, "nested_mode": "matryoshka"}, "train.distill"),
        ({"own_weight_final": 1.5}, "train.own_weight_final"),
        ({"own_weight_final": -0.2}, "train.own_weight_final"),
        ({"own_weight_final": 0.5, "own_weight": "equal"}, "train.own_weight_final"),
        ({"own_weight_final": 0.5, "own_weight": "geometric"}, "train.own_weight_final"),
        ({"nested_mode": "sandwiches"}, "train.nested_mode"),
    ],
)
def test_config_rejects_bad_values(train: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"train": train})


def test_config_accepts_the_new_options() -> None:
    cfg = config_from_dict(
        {"train": {"nested_mode": "sandwich", "distill": 0.5, "own_weight": 0.8, "own_weight_final": 0.4}}
    )
    assert cfg.train.distill == 0.5 and cfg.train.own_weight_final == 0.4
    assert config_from_dict({"train": {"nested_mode": "all", "distill": 1.0}}).train.distill == 1.0
    assert build_plan(cfg).local_config(8, 1).distill == 0.5
    seg = build_plan(
        config_from_dict({"run": {"method": "segment"}, "train": {"nested_mode": "all", "distill": 1.0}})
    )
    assert seg.local_config(8, 1).distill == 0.0 and seg.local_config(8, 1).mode == "plain"


def test_client_update_runs_sandwich_with_distillation_on_the_synthetic_workload() -> None:
    from prelort.federation import client_update
    from prelort.federation.core import initial_state
    from prelort.federation.simulator import build_nested

    cfg = config_from_dict(
        {
            "run": {"rounds": 2, "clients_per_round": 2},
            "clients": {"num_clients": 3, "levels": [2, 4, 8]},
            "train": {"steps": 6, "batch_size": 8, "nested_mode": "sandwich", "distill": 0.5},
            "synthetic": {
                "d_in": 6, "hidden": 10, "d_out": 3, "teacher_rank": 4, "min_examples": 16,
                "max_examples": 24, "test_examples": 12,
            },
        }
    )  # fmt: skip
    plan = build_plan(cfg)
    wl = SyntheticWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)
    nested = build_nested(plan, wl)
    state = initial_state(plan, nested.shapes(), plan.make_rule())
    received = plan.make_rule().downlink(state.adapter, 8)
    res = client_update(nested, received, client_id=2, round_=1, plan=plan, workload=wl)
    assert res.stats.steps == 3 and res.stats.passes == 6
    assert set(res.stats.loss_per_level) >= {8}
