"""``prelort export --all-levels``: a run's adapter at every client level, with a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelort.errors import UserError

if TYPE_CHECKING:
    from prelort.adapters.state import Adapter
    from prelort.config import Config


def export_run_levels(
    cfg: Config, adapter: Adapter, out: Path, *, base_model: str | None, run_dir: Path
) -> list[int]:
    """Write the rank-R global ``adapter`` of the run ``cfg`` to ``out``, one PEFT adapter per
    client level to ``out/r{l}`` and a model card ``out/README.md``; the levels, sorted.

    The card carries the final per-rank metrics of ``run_dir/results.json`` when it is
    readable. A level whose client holds part of the model folded into the base weights (no
    LoRA adapter can carry that), or adapters that ``export_all_levels`` refuses, are one
    ``UserError`` line.
    """
    from prelort.adapters.levels import export_all_levels, model_card, read_record
    from prelort.atomic_files import atomic_write_text
    from prelort.federation.methods import get_method
    from prelort.federation.plan import build_plan

    plan = build_plan(cfg)
    rule = plan.make_rule()
    levels = sorted(cfg.clients.levels)
    R = cfg.max_rank
    folded = [lv for lv in levels if rule.fold(adapter, lv) is not None]
    if folded:
        raise UserError(
            f"--all-levels: a rank-{folded[0]} client of a {cfg.run.method} run holds the full model, "
            "part of it folded into the base weights, which a LoRA adapter cannot carry; "
            f"export --rank {R} (the whole model) or use `prelort eval --run`"
        )
    per_level = {lv: (rule.downlink(adapter, lv), plan.scaling(lv)) for lv in levels}
    method = get_method(cfg.run.method)
    try:
        export_all_levels(
            rule.downlink(adapter, R),
            per_level,
            plan.scaling,
            out,
            base_model_name_or_path=base_model,
            target_modules=cfg.lora.target_modules or None,
            info={"method": cfg.run.method, "base_model": base_model},
        )
    except ValueError as exc:
        raise UserError(f"--all-levels: {exc}; export one rank at a time with --rank") from None
    card = model_card(
        method=cfg.run.method,
        summary=method.summary,
        levels=levels,
        scaling=read_record(out)["scaling"],
        base_model=base_model,
        per_rank=_final_per_rank(run_dir),
        notes=[
            f"Method family: {method.family}",
            f"Rounds: {cfg.run.rounds}, seed {cfg.run.seed}",
            *_model_notes(cfg),
        ],
    )
    atomic_write_text(out / "README.md", card)
    return levels


def _final_per_rank(run_dir: Path) -> Any:
    """``final.per_rank`` of ``run_dir/results.json``; None if it is missing or unreadable."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        return results["final"]["per_rank"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _model_notes(cfg: Config) -> list[str]:
    """What the card should say about the base model (a built-in alias is a GGUF dequantisation)."""
    if cfg.workload.kind != "llm":
        return []
    from prelort.models import BUILTIN_MODELS

    if cfg.llm.model not in BUILTIN_MODELS:
        return []
    return [
        f"The run used the built-in alias `{cfg.llm.model}` "
        f"({BUILTIN_MODELS[cfg.llm.model].description}), dequantised from GGUF: "
        "the metrics below are for those weights"
    ]
