"""Exploratory probe: does prefix-nested training help when the server aggregates products?

Runs prefix-nested local training (PreLort's ``sample`` mode, own weight 0.7) under the
product-based rules RB-LoRA and FlexLoRA (method specs ``prelort-rb`` / ``prelort-flex``
registered here only, not shipped methods), on configs/synthetic.toml, 5 seeds, and writes
the mean relative test MSE per rank next to the plain rules' for comparison.

    .venv/bin/python bench/nesting_probe.py   # -> bench/results/nesting_probe.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from prelort.config import load_config
from prelort.federation import methods
from prelort.federation.methods import MethodSpec
from prelort.federation.simulator import run_simulation
from prelort.workloads import build_workload

VARIANTS = {
    "prelort-rb": MethodSpec("prelort-rb", "rb-lora", nested=True, summary="nested + RB-LoRA rule"),
    "prelort-flex": MethodSpec("prelort-flex", "flexlora", nested=True, summary="nested + FlexLoRA rule"),
}
LEVELS = ("2", "4", "8", "16")


def main() -> None:
    torch.set_num_threads(1)
    methods.METHODS.update(VARIANTS)
    out: dict[str, dict[str, list[float]]] = {}
    for method in ["prelort", "segment", "rb-lora", "prelort-rb", "flexlora", "prelort-flex"]:
        per_seed = []
        for seed in range(5):
            sets = [f'run.method="{method}"', f"run.seed={seed}", "run.eval_every=1000"]
            cfg = load_config(ROOT / "configs" / "synthetic.toml", sets)
            res = run_simulation(cfg, build_workload(cfg))
            per_seed.append([res["final"]["per_rank"][lv]["rel_loss"] for lv in LEVELS])
        out[method] = {
            "mean": [sum(x[i] for x in per_seed) / len(per_seed) for i in range(len(LEVELS))],
            "per_seed": per_seed,  # type: ignore[dict-item]
        }
        print(method, [round(v, 4) for v in out[method]["mean"]], flush=True)
    write_json(
        ROOT / "bench" / "results" / "nesting_probe.json",
        {"levels": list(LEVELS), "rel_loss": out, "machine": machine(), "config": "configs/synthetic.toml"},
    )


if __name__ == "__main__":
    main()
