"""Export: a rank-r PEFT adapter that PeftModel loads and that reproduces PreLort's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from prelort.adapters import LoRAPair, NestedLoRA, Scaling, export_peft_adapter
from prelort.cli import main
from test_llm import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
@pytest.mark.parametrize("r", [2, 8])
def test_export_roundtrip_logits_equal_rank_r_truncation(tmp_path: Path, kind: str, r: int) -> None:
    nested = NestedLoRA(tiny_llama(), ["q_proj", "v_proj"], Scaling(kind, 16.0, 8))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(8, i, generator=g) * 0.2, torch.randn(o, 8, generator=g) * 0.2)
            for n, (o, i) in nested.shapes().items()
        }
    )
    nested.set_rank(r)
    ids = torch.randint(0, 120, (2, 9), generator=g)
    with torch.no_grad():
        ours = nested.model(input_ids=ids).logits
    out = export_peft_adapter(nested.get_adapter(r), nested.scaling(r), tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == r and cfg["lora_alpha"] == pytest.approx(nested.scaling(r) * r)
    assert (out / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, tiny_llama()(input_ids=ids).logits)  # the adapter matters


def test_cli_run_export_eval_on_synthetic(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small = [
        "--set",
        "run.rounds=2",
        "--set",
        "clients.levels=[2,4]",
        "--set",
        "clients.num_clients=4",
        "--set",
        "synthetic.test_examples=40",
    ]
    assert (
        main(["run", "--config", str(ROOT / "configs/synthetic.toml"), "--out", str(run), "--quiet", *small])
        == 0
    )
    assert (run / "global_adapter.safetensors").is_file()
    assert main(["export", "--run", str(run), "--rank", "2", "--out", str(tmp_path / "a2")]) == 0
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["r"] == 2
    assert main(["eval", "--run", str(run), "--ranks", "2,4", "--out", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    final = json.loads((run / "results.json").read_text())["final"]["per_rank"]
    for lv in ("2", "4"):
        assert evaluated[lv]["loss"] == pytest.approx(final[lv]["loss"], rel=1e-5)
    assert main(["export", "--run", str(run), "--rank", "99", "--out", str(tmp_path / "bad")]) == 2
    assert (
        main(["export", "--run", str(tmp_path / "nope"), "--rank", "2", "--out", str(tmp_path / "bad")]) == 2
    )
