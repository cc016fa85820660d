"""In-process federated simulation: one base model in memory, clients run one after another.

The rounds are those of ``prelort.federation.driver.RoundDriver``; this module only supplies
the ``InProcessTransport`` (each sampled client's ``client_update`` on the shared model,
timed, its exceptions turned into dropped clients) and ``run_simulation``, which builds the
plan, the model and the driver. A run can resume from a checkpoint (``resume``) and ends
identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prelort.adapters.nested import NestedLoRA
from prelort.config import Config
from prelort.federation.core import ClientResult, ServerState, client_update
from prelort.federation.driver import RoundCallback, RoundDriver, StateCallback, evaluate_per_rank
from prelort.federation.plan import RunPlan, build_plan
from prelort.federation.run_folder import results_dict
from prelort.federation.transport import ClientJob, ClientOutcome
from prelort.federation.workload import Workload
from prelort.reporting.progress import RoundProgress

ClientFn = Callable[..., ClientResult]

__all__ = [
    "InProcessTransport",
    "build_nested",
    "evaluate_per_rank",
    "results_dict",
    "run_simulation",
]


def build_nested(plan: RunPlan | Config, workload: Workload) -> NestedLoRA:
    """The workload's base model with a rank-R nested LoRA on its target modules."""
    cfg = plan.cfg if isinstance(plan, RunPlan) else plan
    p = plan if isinstance(plan, RunPlan) else build_plan(cfg)
    targets = cfg.lora.target_modules or workload.target_modules
    return NestedLoRA(workload.build_model(), targets, p.scaling, dropout=cfg.lora.dropout)


class InProcessTransport:
    """Runs each job's ``client_fn`` on the shared model, one client after another, with the
    job's base delta on the base weights W0 while its client trains."""

    def __init__(
        self, plan: RunPlan, nested: NestedLoRA, workload: Workload, client_fn: ClientFn = client_update
    ) -> None:
        self.plan, self.nested, self.workload, self.client_fn = plan, nested, workload, client_fn
        self.view: RoundProgress | None = None
        """Set by the driver while a progress display is shown."""

    def execute(self, round_: int, state: ServerState, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        outcomes = []
        for i, job in enumerate(jobs):
            started = time.perf_counter()
            extra: dict[str, Any] = {}
            if self.view is not None:
                self.view.client_started(i, job.client_id, state.client_ranks[job.client_id])
                extra["on_step"] = self.view.step
            try:
                self.nested.set_base(job.base)  # W0 + the downlink's base delta (FLoRA, Fed-PLoRA)
                res = self.client_fn(
                    self.nested,
                    job.received,
                    client_id=job.client_id,
                    round_=round_,
                    plan=self.plan,
                    workload=self.workload,
                    **extra,
                )
            except Exception as exc:  # an unreliable client must not stop the federation
                outcomes.append(ClientOutcome(job.client_id, error=f"raised {type(exc).__name__}: {exc}"))
                continue
            outcomes.append(ClientOutcome(job.client_id, res, seconds=time.perf_counter() - started))
        return outcomes


def run_simulation(
    cfg: Config,
    workload: Workload,
    *,
    on_round: RoundCallback | None = None,
    on_state: StateCallback | None = None,
    progress: bool = False,
    resume: tuple[ServerState, list[dict[str, Any]]] | None = None,
    client_fn: ClientFn = client_update,
) -> dict[str, Any]:
    """Run a whole federated training in this process and return the ``results.json`` dict.

    ``on_state(state, rounds)`` is called after every round (checkpointing); ``resume``
    continues from such a saved state and the rounds recorded so far.
    """
    driver = make_driver(
        cfg, workload, on_round=on_round, on_state=on_state, progress=progress, client_fn=client_fn
    )
    start = time.perf_counter()
    state, rounds = driver.start() if resume is None else (resume[0], list(resume[1]))
    state, rounds = driver.run(state, rounds)
    return driver.results(state, rounds, time.perf_counter() - start)


def make_driver(
    cfg: Config,
    workload: Workload,
    *,
    on_round: RoundCallback | None = None,
    on_state: StateCallback | None = None,
    progress: bool = False,
    client_fn: ClientFn = client_update,
) -> RoundDriver:
    """The in-process ``RoundDriver`` of ``cfg`` (one model shared by clients and evaluation)."""
    plan = build_plan(cfg)
    nested = build_nested(plan, workload)
    transport = InProcessTransport(plan, nested, workload, client_fn)
    return RoundDriver(
        plan, transport, nested, workload, on_state=on_state, on_round=on_round, progress=progress
    )
