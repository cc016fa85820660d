"""Workloads: the tasks a federation trains on."""

from __future__ import annotations

from prelort.config import Config
from prelort.federation.workload import Workload


def build_workload(cfg: Config) -> Workload:
    """The workload named by ``cfg.workload.kind``."""
    if cfg.workload.kind == "synthetic":
        from prelort.workloads.synthetic import SyntheticWorkload

        return SyntheticWorkload(cfg.synthetic, cfg.clients.num_clients, cfg.train.batch_size)
    from prelort.workloads.llm import LLMWorkload

    return LLMWorkload(cfg)
