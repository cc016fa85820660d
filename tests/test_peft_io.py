"""Reading, checking and loading a PEFT adapter folder (``prelort.adapters.peft_io``), called
directly: every damage is one ``UserError`` line naming the file; an intact adapter loads and
computes W x + s B A x."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from conftest import tiny_net
from prelort.adapters import LoRAPair, export_peft_adapter
from prelort.adapters.peft_io import (
    FIX,
    check_peft_adapter,
    load_peft_adapter,
    read_peft_adapter,
)
from prelort.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCALE = 1.5
RANK = 3


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A rank-3 PEFT adapter for ``tiny_net()``'s fc1 (6 -> 10) and fc2 (10 -> 10)."""
    g = torch.Generator().manual_seed(0)
    adapter = {
        "fc1": LoRAPair(torch.randn(RANK, 6, generator=g), torch.randn(10, RANK, generator=g)),
        "fc2": LoRAPair(torch.randn(RANK, 10, generator=g), torch.randn(10, RANK, generator=g)),
    }
    return export_peft_adapter(adapter, SCALE, tmp_path / "adapter")


def _one_line(exc: pytest.ExceptionInfo[UserError], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _edit_config(d: Path, **changes: Any) -> None:
    conf = json.loads((d / "adapter_config.json").read_text())
    conf.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(conf))


def _edit_weights(d: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    w = d / "adapter_model.safetensors"
    save_file(fn({k: v.clone() for k, v in load_file(str(w)).items()}), str(w))


# -- an intact adapter -------------------------------------------------------------------------------
def test_intact_adapter_reads_checks_and_loads_as_w_x_plus_s_b_a_x(adapter_dir: Path) -> None:
    conf, tensors = read_peft_adapter(adapter_dir)
    assert conf["peft_type"] == "LORA" and conf["r"] == RANK
    assert conf["lora_alpha"] == pytest.approx(SCALE * RANK)
    assert sorted(tensors) == [
        f"base_model.model.{m}.lora_{f}.weight" for m in ("fc1", "fc2") for f in ("A", "B")
    ]
    model = tiny_net()
    pairs = check_peft_adapter(adapter_dir, conf, tensors, model)
    assert {n: (tuple(A.shape), tuple(B.shape)) for n, (A, B) in pairs.items()} == {
        "fc1": ((RANK, 6), (10, RANK)),
        "fc2": ((RANK, 10), (10, RANK)),
    }
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    base = tiny_net()
    with torch.no_grad():  # the reference: each target linear plus s * B A x
        h = torch.tanh(base.fc1(x) + SCALE * x @ pairs["fc1"][0].T @ pairs["fc1"][1].T)
        h = torch.tanh(base.fc2(h) + SCALE * h @ pairs["fc2"][0].T @ pairs["fc2"][1].T)
        expected = base.head(h)
        peft_model = load_peft_adapter(adapter_dir, conf, tensors, model).eval()
        got = peft_model(x)
    assert isinstance(peft_model, PeftModel)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- read_peft_adapter: the folder and adapter_config.json ------------------------------------------
CONFIG_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    "not utf-8": (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "not valid JSON"),
    "json list": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "holds a list, not an object"),
    "not lora": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "'PREFIX_TUNING' is not 'LORA'"),
    "r zero": (lambda d: _edit_config(d, r=0), "r = 0 is not a positive integer"),
    "r bool": (lambda d: _edit_config(d, r=True), "r = True is not a positive integer"),
    "r text": (lambda d: _edit_config(d, r="3"), "r = '3' is not a positive integer"),
    "alpha nan": (lambda d: _edit_config(d, lora_alpha=float("nan")), "lora_alpha = nan is not a finite"),
    "alpha text": (lambda d: _edit_config(d, lora_alpha="x"), "lora_alpha = 'x' is not a finite"),
    "targets ints": (lambda d: _edit_config(d, target_modules=[1, 2]), "is not a list of names"),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_bad_adapter_config_is_one_line_naming_the_file(adapter_dir: Path, damage: str) -> None:
    corrupt, needle = CONFIG_DAMAGE[damage]
    corrupt(adapter_dir)
    with pytest.raises(UserError) as exc:
        read_peft_adapter(adapter_dir)
    msg = _one_line(exc, needle, FIX)
    assert msg.startswith(f"{adapter_dir / 'adapter_config.json'}: ")


def test_missing_folder_config_or_weights_and_damaged_weights(adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        read_peft_adapter(tmp_path / "nowhere")
    _one_line(exc, "--adapter", "not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as exc:
        read_peft_adapter(empty)
    _one_line(exc, str(empty), "no adapter_config.json", FIX)

    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(UserError) as exc:
        read_peft_adapter(adapter_dir)
    _one_line(exc, str(weights), "damaged weights file", FIX)

    weights.unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError) as exc:
        read_peft_adapter(adapter_dir)
    _one_line(exc, "no adapter_model.safetensors", "pickles can run code")


# -- check_peft_adapter / load_peft_adapter: the adapter against a model ----------------------------
A1, B1 = "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"
MODEL_DAMAGE: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    "foreign key": (lambda t: {**t, "something.else": torch.zeros(2)}, "not a LoRA A/B weight"),
    "absent module": (
        lambda t: {**t, "base_model.model.fc9.lora_A.weight": t[A1]},
        "which the run's model has no linear layer for",
    ),
    "nan": (lambda t: {**t, A1: t[A1] * float("nan")}, "holds NaN or Inf"),
    "one factor": (lambda t: {k: v for k, v in t.items() if k != B1}, "'fc1' has lora_A only"),
    "wrong shape": (lambda t: {**t, A1: torch.zeros(RANK, 7)}, "do not fit its weight (10, 6)"),
    "wrong rank": (
        lambda t: {**t, A1: torch.zeros(2, 6), B1: torch.zeros(10, 2)},
        "has rank 2 but adapter_config.json says r = 3",
    ),
    "no lora weights": (lambda t: {}, "holds no LoRA weights"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_adapter_that_does_not_fit_the_model_is_one_line(adapter_dir: Path, damage: str) -> None:
    change, needle = MODEL_DAMAGE[damage]
    conf, tensors = read_peft_adapter(adapter_dir)
    with pytest.raises(UserError) as exc:
        check_peft_adapter(adapter_dir, conf, change(tensors), tiny_net())
    _one_line(exc, str(adapter_dir / "adapter_model.safetensors"), needle)
    with pytest.raises(UserError) as exc:  # load checks first: PEFT never sees the bad weights
        load_peft_adapter(adapter_dir, conf, change(tensors), tiny_net())
    _one_line(exc, needle)


def test_target_modules_that_miss_the_weights_are_one_line(adapter_dir: Path) -> None:
    _edit_config(adapter_dir, target_modules=["fc1"])  # PEFT would leave fc2 untrained
    conf, tensors = read_peft_adapter(adapter_dir)
    with pytest.raises(UserError) as exc:
        load_peft_adapter(adapter_dir, conf, tensors, tiny_net())
    _one_line(exc, "target_modules select ['fc1'] but the weights are for ['fc1', 'fc2']", FIX)


def test_an_edited_weights_file_is_what_gets_checked(adapter_dir: Path) -> None:
    _edit_weights(adapter_dir, lambda t: {**t, A1: t[A1] * float("inf")})
    conf, tensors = read_peft_adapter(adapter_dir)
    with pytest.raises(UserError) as exc:
        check_peft_adapter(adapter_dir, conf, tensors, tiny_net())
    _one_line(exc, f"tensor {A1!r} holds NaN or Inf")


# -- the CLI path stays light ------------------------------------------------------------------------
def test_importing_the_cli_imports_neither_torch_nor_peft() -> None:
    code = "import sys, prelort.cli; print(sorted(m for m in ('torch', 'peft') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
