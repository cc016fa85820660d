"""Nested LoRA on PEFT layers: truncation equals a plain PEFT rank-r LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from conftest import tiny_net
from prelort.adapters import LoRAPair, NestedLoRA, Scaling, adapter_num_bytes, init_adapter


def _nested(kind: str = "fixed", R: int = 8, alpha: float = 16.0, seed: int = 0) -> NestedLoRA:
    nested = NestedLoRA(tiny_net(seed), ["fc1", "fc2"], Scaling(kind, alpha, R))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed + 1)
    # random A and B so every rank dimension matters
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(R, s[1], generator=g), torch.randn(s[0], R, generator=g))
            for n, s in nested.shapes().items()
        }
    )
    return nested


def test_scalings() -> None:
    assert Scaling("fixed", 16, 8)(2) == 2.0
    assert Scaling("per_rank", 16, 8)(2) == 8.0
    assert Scaling("rslora", 16, 8)(4) == 8.0
    with pytest.raises(ValueError):
        Scaling("weird", 16, 8)  # type: ignore[arg-type]


def test_init_matches_peft_convention() -> None:
    ad = init_adapter({"m": (4, 9)}, 8, torch.Generator().manual_seed(0))
    assert ad["m"].A.shape == (8, 9) and ad["m"].B.shape == (4, 8)
    assert torch.count_nonzero(ad["m"].B) == 0
    assert ad["m"].A.abs().max() <= 1 / 3 + 1e-6 and ad["m"].A.abs().max() > 0.1


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_rank_r_output_equals_plain_peft_rank_r(kind: str, r: int) -> None:
    nested = _nested(kind)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    nested.set_rank(r)
    got = nested.model(x)

    plain = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=nested.scaling(r) * r, target_modules=["fc1", "fc2"]),
        tiny_net(0),
    )
    with torch.no_grad():
        for name in ["fc1", "fc2"]:
            A, B = nested.factor(name)
            layer = plain.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A[:r])
            layer.lora_B["default"].weight.copy_(B[:, :r])
            assert layer.scaling["default"] == pytest.approx(nested.scaling(r))
    torch.testing.assert_close(got, plain(x))


def test_truncation_gives_no_gradient_beyond_r() -> None:
    nested = _nested()
    for p, _ in nested.parameters_with_rank_dim():
        p.requires_grad_(True)
    nested.set_rank(3)
    nested.model(torch.randn(5, 6)).pow(2).sum().backward()
    A, B = nested.factor("fc1")
    assert A.grad is not None and B.grad is not None
    assert torch.count_nonzero(A.grad[3:]) == 0 and torch.count_nonzero(B.grad[:, 3:]) == 0
    assert torch.count_nonzero(A.grad[:3]) > 0 and torch.count_nonzero(B.grad[:, :3]) > 0


def test_fixed_scaling_prefixes_are_partial_sums() -> None:
    """Under fixed scaling the model at rank r is W0 x + s sum_{i<r} B[:, i] A[i] x, so the
    rank-8 model's fc1 output minus the rank-4 one's is s B[:, 4:] A[4:] x (run on the model)."""
    nested = _nested("fixed")
    A, B = (t.detach().clone() for t in nested.factor("fc1"))
    fc1 = nested.layers["fc1"]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    outs = {}
    with torch.no_grad():
        for r in (4, 8):
            nested.set_rank(r)
            outs[r] = fc1(x)
    s = nested.scaling(8)
    assert s == nested.scaling(4)  # fixed: alpha / R at every rank
    torch.testing.assert_close(outs[8] - outs[4], s * x @ A[4:].T @ B[:, 4:].T, rtol=1e-5, atol=1e-6)


def test_get_set_adapter_roundtrip_and_prefix_zeroing() -> None:
    nested = _nested()
    full = nested.get_adapter(8)
    pref = nested.get_adapter(3)
    assert all(p.rank == 3 for p in pref.values())
    torch.testing.assert_close(pref["fc1"].A, full["fc1"].A[:3])
    nested.set_adapter(pref)
    A, B = nested.factor("fc1")
    assert torch.count_nonzero(A[3:]) == 0 and torch.count_nonzero(B[:, 3:]) == 0
    torch.testing.assert_close(A[:3], full["fc1"].A[:3])
    # copies, not views: mutating the returned adapter leaves the model alone
    pref["fc1"].A.zero_()
    assert torch.count_nonzero(nested.factor("fc1")[0][:3]) > 0
    assert adapter_num_bytes(pref) == sum(3 * (i + o) * 4 for o, i in nested.shapes().values())


def test_set_adapter_rejects_wrong_modules_and_shapes() -> None:
    nested = _nested()
    with pytest.raises(ValueError, match="do not match"):
        nested.set_adapter({"fc1": nested.get_adapter()["fc1"]})
    bad = nested.get_adapter()
    bad["fc1"] = LoRAPair(torch.zeros(2, 99), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="does not fit"):
        nested.set_adapter(bad)


def test_base_is_frozen_and_set_base_delta_is_relative_to_the_original() -> None:
    nested = _nested()
    assert not any(p.requires_grad for p in nested.model.parameters())
    base = copy.deepcopy(nested.layers["fc1"].get_base_layer().weight)
    delta = torch.randn_like(base)
    nested.set_base_delta({"fc1": delta})
    torch.testing.assert_close(nested.layers["fc1"].get_base_layer().weight, base + delta)
    nested.set_base_delta({"fc1": 2 * delta})  # accumulated delta, not added twice
    torch.testing.assert_close(nested.layers["fc1"].get_base_layer().weight, base + 2 * delta)


def test_no_matching_target_is_an_error() -> None:
    with pytest.raises(ValueError):
        NestedLoRA(tiny_net(), ["nope"], Scaling("fixed", 8, 4))
