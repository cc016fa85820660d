"""Privacy-utility trade-off of client-level DP with segment-wise aggregation (issue #12).

Synthetic workload with a larger population (200 clients of ranks {2,4,8,16}, 40 sampled per
round, stratified), clip C fixed, noise multiplier z swept; epsilon from the run's accountant
(``results.json`` ``privacy.epsilon``, delta 1e-5, no subsampling amplification claimed, see
docs/privacy.md); utility = relative test MSE of the rank-2 and rank-16 truncations.

    .venv/bin/python bench/privacy_utility.py   # -> bench/results/privacy_utility.{json,png}
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from prelort.config import load_config
from prelort.federation.simulator import run_simulation
from prelort.workloads import build_workload

POPULATION = [
    "clients.num_clients=200",
    "run.clients_per_round=40",
    "run.rounds=30",
    "run.eval_every=1000",
    "synthetic.min_examples=32",
    "synthetic.max_examples=64",
]


def one(method: str, seed: int, clip: float, z: float | None) -> dict[str, Any]:
    sets = [*POPULATION, f'run.method="{method}"', f"run.seed={seed}"]
    if z is not None:
        sets += [f"privacy.clip={clip}", f"privacy.noise_multiplier={z}", "privacy.delta=1e-5"]
        sets += [f"privacy.noise_seed={seed}"]
    cfg = load_config(ROOT / "configs" / "synthetic.toml", sets)
    res = run_simulation(cfg, build_workload(cfg))
    per_rank = res["final"]["per_rank"]
    eps = res.get("privacy", {}).get("epsilon", math.inf) if z is not None else math.inf
    return {
        "method": method,
        "seed": seed,
        "noise_multiplier": z,
        "clip": clip if z is not None else None,
        "epsilon": eps,
        "rel_loss": {lv: m["rel_loss"] for lv, m in per_rank.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", type=float, default=0.5, help="about the median update norm (0.61) here")
    p.add_argument("--noise", default="1,2,4,8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default="prelort,segment")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for z in [None, *(float(x) for x in args.noise.split(","))]:
                row = one(method, seed, args.clip, z)
                rows.append(row)
                print(method, seed, z, f"eps={row['epsilon']:.3g}", row["rel_loss"], flush=True)
    out = ROOT / "bench" / "results"
    write_json(
        out / "privacy_utility.json",
        {"population": POPULATION, "clip": args.clip, "delta": 1e-5, "rows": rows, "machine": machine()},
    )
    plot(rows, out / "privacy_utility.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, lv in zip(axes, ["2", "16"], strict=True):
        for method, style in (("prelort", "o-"), ("segment", "s--")):
            by_z: dict[float | None, list[dict[str, Any]]] = {}
            for r in rows:
                if r["method"] == method:
                    by_z.setdefault(r["noise_multiplier"], []).append(r)
            zs = sorted(z for z in by_z if z is not None)
            eps = [sum(r["epsilon"] for r in by_z[z]) / len(by_z[z]) for z in zs]
            loss = [sum(r["rel_loss"][lv] for r in by_z[z]) / len(by_z[z]) for z in zs]
            ax.plot(eps, loss, style, label=f"{method} (DP)")
            if None in by_z:
                base = sum(r["rel_loss"][lv] for r in by_z[None]) / len(by_z[None])
                ax.axhline(
                    base,
                    linestyle=":",
                    color="grey" if method == "segment" else "black",
                    label=f"{method}, no DP",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({round(r["epsilon"], 1) for r in rows if math.isfinite(r["epsilon"])})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (delta = 1e-5, all rounds)")
        ax.set_title(f"rank {lv}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative test MSE")
    axes[1].legend(fontsize=8)
    fig.suptitle("Client-level DP with segment-wise aggregation: 200 clients, 40 per round, 30 rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
