"""`export --all-levels`: one folder that PEFT loads as one adapter per level plus the rank-R
adapter, ``truncate`` serving any rank from the latter, short targets, hub ids, model card.

Expected logits come from the project's own NestedLoRA at rank r, or from a tiny model whose
target weights get W + s B[:, :r] A[:r] added by hand; never from the code under test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from prelort.adapters import LoRAPair, NestedLoRA, Scaling, export_all_levels, load_all_levels, truncate
from prelort.adapters.export import export_peft_adapter
from prelort.aggregation import RuleOptions, get_rule
from prelort.cli import _base_model_path, main
from prelort.config import config_from_dict
from test_llm import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (2, 4, 8)
R = 8
TARGETS = ["q_proj", "v_proj"]


def _nested(kind: str) -> NestedLoRA:
    nested = NestedLoRA(tiny_llama(), TARGETS, Scaling(kind, 16.0, R))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    nested.set_adapter(
        {
            n: LoRAPair(torch.randn(R, i, generator=g) * 0.2, torch.randn(o, R, generator=g) * 0.2)
            for n, (o, i) in nested.shapes().items()
        }
    )
    return nested


def _ids() -> torch.Tensor:
    return torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))


def _nested_logits(nested: NestedLoRA, r: int) -> torch.Tensor:
    nested.set_rank(r)
    with torch.no_grad():
        return nested.model(input_ids=_ids()).logits


def _merged_by_hand(adapter: dict[str, LoRAPair], r: int, scale: float) -> torch.Tensor:
    """Logits of tiny_llama with W += scale * B[:, :r] @ A[:r] on every adapted module."""
    model = tiny_llama()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in adapter.items():
            w = modules[name].weight
            w += (scale * pair.B[:, :r].double() @ pair.A[:r].double()).to(w.dtype)
        return model(input_ids=_ids()).logits


def _logits(model: PeftModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _export(nested: NestedLoRA, out: Path) -> Path:
    levels = {lv: (nested.get_adapter(lv), nested.scaling(lv)) for lv in LEVELS}
    return export_all_levels(
        nested.get_adapter(R),
        levels,
        nested.scaling,
        out,
        info={"method": "prelort", "base_model": None},
    )


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
def test_every_level_loads_with_peft_and_matches_rank_r_truncation(tmp_path: Path, kind: str) -> None:
    nested = _nested(kind)
    out = _export(nested, tmp_path / "all")
    expected = {r: _nested_logits(nested, r) for r in LEVELS}
    for lv in LEVELS:  # each subfolder alone, as a plain PEFT adapter
        conf = json.loads((out / f"r{lv}" / "adapter_config.json").read_text())
        assert conf["r"] == lv and conf["lora_alpha"] == pytest.approx(Scaling(kind, 16.0, R)(lv) * lv)  # type: ignore[arg-type]
        model = PeftModel.from_pretrained(tiny_llama(), str(out / f"r{lv}")).eval()
        torch.testing.assert_close(_logits(model), expected[lv], rtol=1e-5, atol=1e-5)
    # the top level is the rank-R adapter; the levels join it as named adapters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Unexpected keyword")  # PEFT: config keys it lacks
        model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    torch.testing.assert_close(_logits(model), expected[R], rtol=1e-5, atol=1e-5)
    for lv in LEVELS:
        model.load_adapter(str(out / f"r{lv}"), adapter_name=f"r{lv}")
    for lv in LEVELS:
        model.set_adapter(f"r{lv}")
        torch.testing.assert_close(_logits(model), expected[lv], rtol=1e-5, atol=1e-5)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == TARGETS  # short suffixes, not full module paths
    assert not (tmp_path / "all" / "README.md").exists()  # the card is the CLI's


@pytest.mark.parametrize("kind", ["fixed", "per_rank", "rslora"])
def test_truncate_rank_r_adapter_equals_level_r_adapter(tmp_path: Path, kind: str) -> None:
    nested = _nested(kind)
    out = _export(nested, tmp_path / "all")
    model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    for r in range(1, R + 1):  # levels and the ranks between them
        truncate(model, r, scaling=out, new_adapter_name=f"t{r}")
        model.set_adapter(f"t{r}")
        torch.testing.assert_close(_logits(model), _nested_logits(nested, r), rtol=1e-5, atol=1e-5)
    model.set_adapter("default")  # the copies left the rank-R adapter as it was
    torch.testing.assert_close(_logits(model), _nested_logits(nested, R), rtol=1e-5, atol=1e-5)
    # in place, against the PEFT-loaded level adapter
    level = PeftModel.from_pretrained(tiny_llama(), str(out / "r2")).eval()
    inplace = truncate(PeftModel.from_pretrained(tiny_llama(), str(out)).eval(), 2, scaling=out)
    assert inplace.peft_config["default"].r == 2
    torch.testing.assert_close(_logits(inplace), _logits(level), rtol=1e-5, atol=1e-5)
    # fixed scaling: s(r) = alpha / R at every r, checked by hand
    if kind == "fixed":
        by_hand = _merged_by_hand(nested.get_adapter(R), 2, 16.0 / R)
        torch.testing.assert_close(_logits(inplace), by_hand, rtol=1e-4, atol=1e-4)


def test_load_all_levels_then_truncate_needs_no_scaling(tmp_path: Path) -> None:
    nested = _nested("per_rank")
    out = _export(nested, tmp_path / "all")
    model = load_all_levels(tiny_llama(), out).eval()
    assert set(model.peft_config) == {"default", "r2", "r4", "r8"}
    truncate(model, 3, new_adapter_name="r3")
    model.set_adapter("r3")
    torch.testing.assert_close(_logits(model), _nested_logits(nested, 3), rtol=1e-5, atol=1e-5)
    plain = PeftModel.from_pretrained(tiny_llama(), str(out))
    with pytest.raises(ValueError, match="no recorded scaling"):
        truncate(plain, 3)
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate(plain, R + 1, scaling=out)


def test_flexlora_levels_rescale_b_and_truncate_follows(tmp_path: Path) -> None:
    """FlexLoRA's rank-r downlink is the prefix with B * s(R) / s(r): the recorded prefix
    scaling is then fixed at s(R), and truncation still gives each level's model."""
    nested = _nested("per_rank")
    scaling = Scaling("per_rank", 16.0, R)
    rule = get_rule("flexlora", RuleOptions(scaling=scaling, seed=0))
    full = nested.get_adapter(R)
    levels = {lv: (rule.downlink(full, lv), scaling(lv)) for lv in LEVELS}
    out = export_all_levels(rule.downlink(full, R), levels, scaling, tmp_path / "all")
    model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    for lv in LEVELS:
        level = PeftModel.from_pretrained(tiny_llama(), str(out / f"r{lv}")).eval()
        by_hand = _merged_by_hand(full, lv, scaling(R))  # s(r) * B * s(R)/s(r) = s(R) B
        torch.testing.assert_close(_logits(level), by_hand, rtol=1e-4, atol=1e-4)
        truncate(model, lv, scaling=out, new_adapter_name=f"t{lv}")
        model.set_adapter(f"t{lv}")
        torch.testing.assert_close(_logits(model), _logits(level), rtol=1e-5, atol=1e-5)


def test_non_prefix_level_is_refused(tmp_path: Path) -> None:
    nested = _nested("fixed")
    full = nested.get_adapter(R)
    other = {n: LoRAPair(p.A[2:4].clone(), p.B[:, 2:4].clone()) for n, p in full.items()}
    with pytest.raises(ValueError, match="not the rank-2 prefix"):
        export_all_levels(full, {2: (other, 2.0), 8: (full, 2.0)}, Scaling("fixed", 16.0, R), tmp_path / "x")


def test_single_rank_export_has_short_targets_and_hub_id(tmp_path: Path) -> None:
    nested = _nested("fixed")
    out = export_peft_adapter(nested.get_adapter(4), 2.0, tmp_path / "a", base_model_name_or_path="x/y")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == TARGETS and conf["base_model_name_or_path"] == "x/y"
    with pytest.raises(ValueError, match="do not select"):
        export_peft_adapter(nested.get_adapter(4), 2.0, tmp_path / "b", target_modules=["k_proj"])
    llm = {"workload": {"kind": "llm"}}
    smol = config_from_dict({**llm, "llm": {"model": "smollm2-135m"}})
    gemma = config_from_dict({**llm, "llm": {"model": "gemma3-270m"}})
    folder = config_from_dict({**llm, "llm": {"model": "models/my-llama"}})
    assert _base_model_path(smol) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _base_model_path(gemma) == "google/gemma-3-270m-it"
    assert _base_model_path(folder) == "models/my-llama"
    assert _base_model_path(config_from_dict({})) is None  # synthetic


def test_cli_export_all_levels_writes_levels_record_and_model_card(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small = ["run.rounds=2", "clients.levels=[2,4]", "clients.num_clients=4", "synthetic.test_examples=40"]
    sets = [a for s in small for a in ("--set", s)]
    assert (
        main(["run", "--config", str(ROOT / "configs/synthetic.toml"), "--out", str(run), "--quiet", *sets])
        == 0
    )
    out = tmp_path / "all"
    assert main(["export", "--run", str(run), "--all-levels", "--out", str(out)]) == 0
    final = json.loads((run / "results.json").read_text())["final"]["per_rank"]
    for lv in (2, 4):
        conf = json.loads((out / f"r{lv}" / "adapter_config.json").read_text())
        assert conf["r"] == lv and all("." not in t for t in conf["target_modules"])
    top = json.loads((out / "adapter_config.json").read_text())
    assert top["r"] == 4 and all("." not in t for t in top["target_modules"])
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:  # type: ignore[no-untyped-call]
        record = json.loads(f.metadata()["prelort"])
    cfg_text = (run / "config.toml").read_text()
    assert record["levels"] == [2, 4] and record["rank"] == 4 and record["method"] in cfg_text
    assert record["scaling"]["max_rank"] == 4 and record["scaling"]["kind"] in ("fixed", "per_rank", "rslora")
    card = (out / "README.md").read_text()
    assert "r2/" in card and "r4/" in card and "library_name: peft" in card
    for lv in ("2", "4"):  # the per-rank table holds the run's final metrics
        row = next(line for line in card.splitlines() if line.startswith(f"| {lv} |"))
        assert f"{final[lv]['loss']:.4f}" in row
    # a non-empty --out is refused; --rank and --all-levels exclude each other
    assert main(["export", "--run", str(run), "--all-levels", "--out", str(out)]) == 2
    assert (
        main(["export", "--run", str(run), "--all-levels", "--rank", "2", "--out", str(tmp_path / "b")]) == 2
    )
