"""[train]'s scale options: gradient accumulation, learning-rate schedules, gradient
checkpointing and autocast (issue #20 item 3). Tiny models built here; expectations computed
independently of ``train_local``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_net
from prelort.adapters import LoRAPair, NestedLoRA, Scaling
from prelort.config import TrainSection, config_from_dict
from prelort.errors import ConfigError, UserError
from prelort.federation.plan import build_plan
from prelort.training import LocalTrainConfig, MaskedAdamW, train_local
from prelort.training import local as local_module
from prelort.training.schedule import (
    enable_gradient_checkpointing,
    make_scheduler,
    uses_gradient_checkpointing,
)

R = 8


def _nested(model: torch.nn.Module | None = None, targets: tuple[str, ...] = ("fc1", "fc2")) -> NestedLoRA:
    nested = NestedLoRA(model if model is not None else tiny_net(0), list(targets), Scaling("fixed", 16.0, R))
    g = torch.Generator().manual_seed(1)
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(R, s[1], generator=g) * 0.3, torch.randn(s[0], R, generator=g) * 0.3)
            for n, s in nested.shapes().items()
        }
    )
    return nested


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return x, torch.sin(x[:, :4] * 3)


def _mse(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.mean((model(x) - y) ** 2)


def _params(nested: NestedLoRA) -> list[torch.Tensor]:
    return [p.detach().clone() for p, _ in nested.parameters_with_rank_dim()]


def _run(nested: NestedLoRA, batches: Iterator[Any], **kw: Any) -> Any:
    cfg = LocalTrainConfig(**kw)
    return train_local(nested, R, [2, 4, 8], batches, _mse, cfg, torch.Generator().manual_seed(5))


# (a) gradient accumulation ------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_step_is_the_step_on_the_concatenated_batch(k: int) -> None:
    b = 5
    x, y = _data(k * b)
    micro = iter([(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(k)])
    # eps = 1: AdamW's first step is lr g / (|g| + 1), sensitive to the gradient's scale
    opts = {"steps": 1, "lr": 0.05, "eps": 1.0, "weight_decay": 0.01, "mode": "plain"}
    acc = _nested()
    stats = _run(acc, micro, grad_accum=k, **opts)

    # independent: the gradient of the mean loss on the whole batch, then one torch AdamW step
    ref = _nested()
    ps = [p for p, _ in ref.parameters_with_rank_dim()]
    for p in ps:
        p.requires_grad_(True)
    ref.set_rank(R)
    ref.model.train()
    _mse(ref.model, (x, y)).backward()
    opt = torch.optim.AdamW(ps, lr=0.05, eps=1.0, weight_decay=0.01)
    opt.step()
    for got, want in zip(_params(acc), ps, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert (stats.steps, stats.passes, stats.examples) == (1, k, k * b)


@pytest.mark.parametrize("mode", ["plain", "sample", "sandwich", "all"])
def test_accumulation_matches_concatenated_batches_over_several_steps(mode: str) -> None:
    k, b, steps = 3, 4, 3
    x, y = _data(k * b * steps, seed=2)
    micro = [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(k * steps)]
    whole = [(x[i * k * b : (i + 1) * k * b], y[i * k * b : (i + 1) * k * b]) for i in range(steps)]
    opts = {"steps": steps, "lr": 0.05, "eps": 1.0, "mode": mode, "own_weight": 0.6}
    acc, ref = _nested(), _nested()
    s_acc = _run(acc, iter(micro), grad_accum=k, **opts)
    s_ref = _run(ref, iter(whole), **opts)
    for got, want in zip(_params(acc), _params(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert s_acc.passes == k * s_ref.passes and s_acc.examples == s_ref.examples == k * b * steps
    assert s_acc.steps == s_ref.steps == steps


def test_grad_accum_one_is_bit_identical_to_the_default() -> None:
    x, y = _data(64, seed=3)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    a, b = _nested(), _nested()
    sa = _run(a, iter(batches), steps=8, mode="sample", own_weight=0.7)
    sb = _run(b, iter(batches), steps=8, mode="sample", own_weight=0.7, grad_accum=1)
    assert sa == sb
    for p, q in zip(_params(a), _params(b), strict=True):
        assert torch.equal(p, q)


def test_plan_counts_optimiser_steps_and_passes_scale_with_grad_accum() -> None:
    over = ["train.grad_accum=4", "train.steps=12", 'train.nested_mode="all"', "clients.levels=[2,4,8]"]
    plan = build_plan(config_from_dict({}, over))
    base = build_plan(config_from_dict({}, over[1:]))
    for r in (2, 4, 8):
        assert plan.local_steps(r) == base.local_steps(r)
        cfg = plan.local_config(r, 1)
        assert cfg.grad_accum == 4 and cfg.steps == base.local_config(r, 1).steps


# (b) learning-rate schedules ----------------------------------------------------------


def _expected_lr(kind: str, lr: float, t: int, warmup: int, total: int) -> float:
    """lr of optimiser step t (0-based), by hand."""
    if t < warmup:
        return lr * t / warmup
    if kind == "constant":
        return lr
    progress = (t - warmup) / max(1, total - warmup)
    if kind == "linear":
        return lr * max(0.0, 1.0 - progress)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_learning_rates_follow_the_formula(kind: str) -> None:
    lr, warmup, total = 0.1, 3, 10
    p = torch.nn.Parameter(torch.randn(R, 4))
    opt = MaskedAdamW([(p, 0)], lr=lr)
    sched = make_scheduler(opt, kind, warmup, total)  # type: ignore[arg-type]
    assert sched is not None
    assert opt.param_groups[0]["lr"] == pytest.approx(_expected_lr(kind, lr, 0, warmup, total))
    for t in range(total):
        p.grad = torch.ones_like(p)
        opt.step(R)
        sched.step()
        got = opt.param_groups[0]["lr"]
        assert got == pytest.approx(_expected_lr(kind, lr, t + 1, warmup, total), abs=1e-12)


def test_constant_without_warmup_makes_no_scheduler() -> None:
    opt = MaskedAdamW([(torch.nn.Parameter(torch.zeros(2, 2)), 0)], lr=0.1)
    assert make_scheduler(opt, "constant", 0, 10) is None
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_train_local_steps_with_the_scheduled_rates(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[float] = []

    class Recording(MaskedAdamW):
        def step(self, rank: int) -> None:  # type: ignore[override]
            used.append(self.param_groups[0]["lr"])
            super().step(rank)

    monkeypatch.setattr(local_module, "MaskedAdamW", Recording)
    x, y = _data(8)
    batches = iter([(x, y)] * 20)
    _run(_nested(), batches, steps=6, lr=0.02, lr_schedule=kind, warmup_steps=2, grad_accum=2)
    assert used == pytest.approx([_expected_lr(kind, 0.02, t, 2, 6) for t in range(6)], abs=1e-12)


# (c) gradient checkpointing -----------------------------------------------------------


def _tiny_llama() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            eos_token_id=1,
            pad_token_id=1,
            bos_token_id=1,
        )
        return LlamaForCausalLM(cfg)


def _lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out: Any = model(input_ids=batch, labels=batch, use_cache=False)
    return out.loss  # type: ignore[no-any-return]


def _lora_grads(checkpointing: bool) -> list[torch.Tensor]:
    model = _tiny_llama()
    if checkpointing:
        enable_gradient_checkpointing(model)
    nested = _nested(model, ("q_proj", "v_proj"))
    assert uses_gradient_checkpointing(nested.model) == checkpointing
    ps = [p for p, _ in nested.parameters_with_rank_dim()]
    for p in ps:
        p.requires_grad_(True)
    nested.set_rank(4)
    nested.model.train()
    mlp = model.model.layers[0].mlp
    calls, forward = [0], mlp.forward

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return forward(*args)

    mlp.forward = counted  # type: ignore[method-assign]
    ids = torch.randint(2, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    _lm_loss(nested.model, ids).backward()
    assert calls[0] == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
    assert all(p.grad is not None for p in ps)
    return [p.grad.clone() for p in ps if p.grad is not None]


def test_gradient_checkpointing_leaves_lora_gradients_unchanged() -> None:
    plain, ckpt = _lora_grads(False), _lora_grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_train_local_with_checkpointing_matches_without() -> None:
    ids = torch.randint(2, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    out = []
    for ckpt in (False, True):
        model = _tiny_llama()
        if ckpt:
            enable_gradient_checkpointing(model)
        nested = _nested(model, ("q_proj", "v_proj"))
        cfg = LocalTrainConfig(steps=2, lr=0.01, mode="plain", gradient_checkpointing=ckpt)
        train_local(nested, R, [R], iter([ids] * 4), _lm_loss, cfg, torch.Generator().manual_seed(0))
        out.append(_params(nested))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_needs_a_model_that_has_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
        enable_gradient_checkpointing(tiny_net(0))
    x, y = _data(8)
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
        _run(_nested(), iter([(x, y)]), steps=1, gradient_checkpointing=True)


# (d) validation and autocast ----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_accum=0", r"train\.grad_accum = 0 must be a positive integer"),
        ("train.warmup_steps=-1", r"train\.warmup_steps = -1 must be an integer >= 0"),
        ('train.lr_schedule="step"', r"train\.lr_schedule = 'step' is not one of"),
        ('train.autocast="fp8"', r"train\.autocast = 'fp8' is not one of"),
    ],
)
def test_config_rejects_bad_scale_options(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grad_accum", 0, r"train\.grad_accum"),
        ("grad_accum", True, r"train\.grad_accum"),
        ("warmup_steps", -2, r"train\.warmup_steps"),
        ("lr_schedule", "exp", r"train\.lr_schedule"),
        ("autocast", "int8", r"train\.autocast"),
    ],
)
def test_train_section_validate_names_the_key(field: str, value: Any, message: str) -> None:
    section = TrainSection(**{field: value})
    with pytest.raises(ConfigError, match=message) as info:
        section.validate()
    assert "\n" not in str(info.value)


def test_defaults_validate_and_configure_nothing_new() -> None:
    t = config_from_dict({}).train
    assert (t.grad_accum, t.lr_schedule, t.warmup_steps, t.autocast, t.gradient_checkpointing) == (
        1,
        "constant",
        0,
        "none",
        False,
    )


def test_fp16_autocast_on_cpu_is_a_clear_error() -> None:
    x, y = _data(8)
    nested = _nested()
    before = _params(nested)
    with pytest.raises(UserError, match=r'train\.autocast = "fp16" needs a CUDA device'):
        _run(nested, iter([(x, y)]), steps=1, autocast="fp16")
    for p, q in zip(before, _params(nested), strict=True):
        assert torch.equal(p, q)
    assert all(not p.requires_grad for p, _ in nested.parameters_with_rank_dim())


def test_bf16_autocast_on_cpu_trains_close_to_full_precision() -> None:
    x, y = _data(16)
    full, half = _nested(), _nested()
    s_full = _run(full, iter([(x, y)] * 3), steps=3, lr=0.01)
    s_half = _run(half, iter([(x, y)] * 3), steps=3, lr=0.01, autocast="bf16")
    assert math.isfinite(s_half.loss) and s_half.loss == pytest.approx(s_full.loss, rel=0.05)
    for p, q in zip(_params(full), _params(half), strict=True):
        assert p.dtype == q.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_cuda_autocast_trains(mode: str) -> None:
    x, y = _data(16)
    nested = _nested(tiny_net(0).cuda())
    batches = iter([(x.cuda(), y.cuda())] * 4)
    stats = _run(nested, batches, steps=4, lr=0.01, autocast=mode, grad_accum=2)
    assert math.isfinite(stats.loss) and stats.passes == 4


def _llm_workload(model: torch.nn.Module, **train: Any) -> Any:
    """An ``LLMWorkload`` holding ``model`` as its loaded base model (no data, no loading)."""
    from prelort.workloads.llm import LLMWorkload

    workload = LLMWorkload.__new__(LLMWorkload)
    workload._model = model
    workload.gradient_checkpointing = train.get("gradient_checkpointing", False)
    workload.autocast = train.get("autocast", "none")
    return workload


def test_llm_workload_builds_the_model_with_checkpointing_or_a_clear_error() -> None:
    model = _llm_workload(_tiny_llama(), gradient_checkpointing=True).build_model()
    assert uses_gradient_checkpointing(model)
    assert not uses_gradient_checkpointing(_llm_workload(_tiny_llama()).build_model())
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing = true"):
        _llm_workload(tiny_net(0), gradient_checkpointing=True).build_model()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r'train\.autocast = "fp16" needs a CUDA device'):
            _llm_workload(_tiny_llama(), autocast="fp16").build_model()


# ----------------------------------------------------------------------------- 4-bit / 8-bit base


def test_quantization_off_cuda_is_a_clear_error_before_any_weight_is_read(tmp_path: Path) -> None:
    """``llm.quantization`` on a CPU run: one line naming the key and the device, raised before
    the model is read (here a folder that does not even exist)."""
    from prelort.models import ModelLoadError, load_causal_lm

    for q in ("4bit", "8bit"):
        with pytest.raises(
            ModelLoadError, match=rf"llm\.quantization = '{q}' needs bitsandbytes on a CUDA device"
        ):
            load_causal_lm(str(tmp_path / "no-model"), device="cpu", quantization=q)


def test_quantization_configs_are_qlora_nf4_and_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA with bitsandbytes installed (simulated: this test only builds the configs), 4bit is
    QLoRA's NF4 with double quantisation computing in the run's dtype, 8bit LLM.int8()."""
    import importlib.util

    from prelort.models import ModelLoadError
    from prelort.models.loading import bitsandbytes_config

    real = importlib.util.find_spec
    assert bitsandbytes_config("none", torch.float32, torch.device("cpu")) is None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="needs the bitsandbytes package"):
        bitsandbytes_config("4bit", torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    four = bitsandbytes_config("4bit", torch.bfloat16, torch.device("cuda"))
    assert (four.load_in_4bit, four.load_in_8bit) == (True, False)
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("nf4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = bitsandbytes_config("8bit", torch.float16, torch.device("cuda"))
    assert (eight.load_in_8bit, eight.load_in_4bit) == (True, False)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        bitsandbytes_config("2bit", torch.float16, torch.device("cuda"))


def test_quantized_base_refuses_methods_that_merge_into_it() -> None:
    with pytest.raises(ConfigError, match=r"run\.method = 'flora' merges updates into the base weights"):
        config_from_dict(
            {"workload": {"kind": "llm"}, "run": {"method": "flora"}, "llm": {"quantization": "4bit"}}
        )
    assert (
        config_from_dict({"workload": {"kind": "llm"}, "llm": {"quantization": "4bit"}}).llm.quantization
        == "4bit"
    )
    with pytest.raises(ConfigError, match=r"llm\.quantization"):
        config_from_dict({"llm": {"quantization": "3bit"}})
