"""A run in its folder (docs/design.md §7-§8): ``config.toml``, a checkpoint and the global
adapter after every round (a driver observer), TensorBoard events, ``results.json``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelort.config import Config, config_to_dict, dump_toml
from prelort.federation.core import ServerState
from prelort.federation.methods import ORDER_RULES
from prelort.federation.privacy import privacy_report

if TYPE_CHECKING:
    from prelort.aggregation.base import AggregationRule
    from prelort.federation.driver import RoundDriver, RoundObserver
    from prelort.federation.plan import RunPlan

log = logging.getLogger("prelort")


def results_dict(
    plan: RunPlan, state: ServerState, rounds: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """The ``results.json`` content: per-round records, final per-rank metrics and totals.

    ``family`` says what a per-rank column means (docs/design.md §4); ``total_passes`` counts
    forward/backward passes over all clients and rounds (docs/design.md §3).
    """
    cfg, method = plan.cfg, plan.method
    out: dict[str, Any] = {
        "method": method.name,
        "family": method.family,
        "seed": plan.seed,
        "ranks": list(plan.capacities),
        "effective_ranks": list(plan.ranks),
        "final_ranks": list(state.client_ranks),
        "levels": list(plan.eval_levels),
        "client_levels": list(plan.levels),
        "rounds": rounds,
        "final": {"per_rank": rounds[-1]["per_rank"]},
        "total_seconds": seconds,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_passes": sum(r.get("passes", 0) for r in rounds),
        "total_examples": sum(r.get("examples", 0) for r in rounds),
        "config": config_to_dict(cfg),
        "summary": method.summary,
    }
    if method.level is not None:
        out["oracle_level"] = method.level
    if method.rule in ORDER_RULES:  # ``aggregation.order = "auto"`` resolved
        out["resolved"] = {"aggregation.order": plan.order, "aggregation.split": cfg.aggregation.split}
    if plan.privacy is not None:
        out["privacy"] = privacy_report(plan.privacy, state.round)
    return out


class FolderCheckpoint:
    """Driver observer: after every round the checkpoint and the global adapter in ``out``."""

    def __init__(self, out: Path, cfg: Config, rule: AggregationRule) -> None:
        self.out, self.cfg, self.rule = out, cfg, rule

    def on_round(self, record: dict[str, Any]) -> None:
        """Nothing: the round's record is in the checkpoint written by ``on_state``."""

    def on_state(self, state: ServerState, rounds: list[dict[str, Any]]) -> None:
        from prelort.federation.artifacts import save_global
        from prelort.federation.checkpoint import save_checkpoint

        save_checkpoint(self.out, state, rounds, self.cfg)
        save_global(self.out, state, self.rule.merged(state.rule_state))


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"rounds": 3}}`` -> ``{"run.rounds": 3}`` (tables flattened, lists kept)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def run_in_folder(
    driver: RoundDriver,
    out: Path,
    *,
    log_line: Callable[[str], None] = log.info,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``driver``'s plan in ``out``: config.toml, a checkpoint and the global
    adapter after every round, results.json at the end (docs/design.md §8)."""
    from prelort.federation.checkpoint import load_checkpoint
    from prelort.reporting.files import atomic_write_text, write_results
    from prelort.reporting.progress import MLflowLog, TensorBoardLog

    cfg = driver.plan.cfg
    start = time.perf_counter()
    resume = load_checkpoint(out, cfg, log=log_line)
    earlier = 0.0  # seconds spent by the processes before a resume, from their round records
    if resume is not None:
        log_line(f"resuming {out} after round {resume[0].round}")
        state, rounds = resume[0], list(resume[1])
        earlier = sum(float(r.get("seconds", 0.0)) for r in rounds)
    else:
        atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
        state, rounds = driver.start()
    observers: list[RoundObserver] = [FolderCheckpoint(out, cfg, driver.rule)]
    boards: list[TensorBoardLog | MLflowLog] = []
    try:
        for target in cfg.run.reports():
            if target == "tensorboard":
                boards.append(TensorBoardLog(out / "tensorboard"))
            else:
                uri = cfg.run.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
                params = flatten_config(config_to_dict(cfg))
                boards.append(MLflowLog(uri, out.resolve().name, params))
        for board in boards:
            for record in rounds:  # what an earlier, interrupted process already logged is rewritten
                board.on_round(record)
            observers.append(board)
        state, rounds = driver.run(state, rounds, observers=observers)
    finally:
        for board in boards:
            board.close()
    results = driver.results(state, rounds, earlier + time.perf_counter() - start)
    results.update(extra or {})
    write_results(out, results, cfg)
    return results
